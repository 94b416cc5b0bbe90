"""Gopher's quality and repetition heuristics (Rae et al. 2021, appendix A), as used by FineWeb.

Thresholds come from :class:`llm.config.GopherQualityConfig` / :class:`GopherRepetitionConfig`,
whose defaults are datatrove's published defaults. Each rule returns ``(keep, reason)`` where
``reason`` names the first check that removed the document (``None`` when kept).

The n-gram checks work on 64-bit hashes of word n-grams (numpy) instead of joined strings,
and skip the exact greedy duplicate scan when a cheap upper bound already shows the document
is under the threshold, which is the common case.
"""

from __future__ import annotations

import re

import numpy as np

from llm.config import GopherQualityConfig, GopherRepetitionConfig
from llm.data.filters.text import Doc, as_doc, duplicate_stats

Verdict = tuple[bool, str | None]

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLET_LINE = re.compile(r"\s*[•\-]").match
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)\s*\Z").search


def gopher_quality(doc: Doc | str, cfg: GopherQualityConfig = GopherQualityConfig()) -> Verdict:
    """Word count, mean word length, symbol ratios, bullet/ellipsis lines, alphabetic words, stop words.

    A ``None`` or 0 threshold disables its check, as in datatrove.
    """
    doc = as_doc(doc)
    text = doc.text
    n_words = len(doc.words)
    n_real = n_words - doc.n_symbol_words  # words with at least one non-punctuation character
    if n_words == 0 or n_real == 0:
        return False, "gopher_quality.short_doc"
    if cfg.min_doc_words and n_real < cfg.min_doc_words:
        return False, "gopher_quality.short_doc"
    if cfg.max_doc_words and n_real > cfg.max_doc_words:
        return False, "gopher_quality.long_doc"

    avg_len = (int(doc.word_cumlen[-1]) - doc.symbol_word_chars) / n_real
    if cfg.min_avg_word_length and avg_len < cfg.min_avg_word_length:
        return False, "gopher_quality.avg_word_length_low"
    if cfg.max_avg_word_length and avg_len > cfg.max_avg_word_length:
        return False, "gopher_quality.avg_word_length_high"

    if cfg.max_symbol_word_ratio:
        if text.count("#") / n_words > cfg.max_symbol_word_ratio:
            return False, "gopher_quality.hash_ratio"
        if (text.count("...") + text.count("…")) / n_words > cfg.max_symbol_word_ratio:
            return False, "gopher_quality.ellipsis_ratio"

    lines = doc.lines or [""]
    if cfg.max_bullet_lines_ratio and sum(map(bool, map(_BULLET_LINE, lines))) / len(lines) > cfg.max_bullet_lines_ratio:
        return False, "gopher_quality.bullet_lines"
    if cfg.max_ellipsis_lines_ratio and sum(map(bool, map(_ELLIPSIS_LINE, lines))) / len(lines) > cfg.max_ellipsis_lines_ratio:
        return False, "gopher_quality.ellipsis_lines"

    if cfg.max_non_alpha_words_ratio and doc.n_alpha_words / n_words < cfg.max_non_alpha_words_ratio:
        return False, "gopher_quality.alpha_words"

    if cfg.min_stop_words and len(STOP_WORDS.intersection(doc.words)) < cfg.min_stop_words:
        return False, "gopher_quality.stop_words"
    return True, None


def _top_ngram_chars(doc: Doc, n: int) -> int:
    """Characters covered by the most frequent n-gram (earliest one on ties), spaces included."""
    h = doc.ngram_hashes(n)
    s = np.sort(h)
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    counts = np.diff(np.append(starts, len(s)))
    top = int(counts.max())
    if top == 1:
        i = 0  # every n-gram is unique: the first one wins the tie
    else:
        tied = s[starts[counts == top]]
        # the earliest position holding any tied value is the first occurrence that wins
        i = int(np.argmax(h == tied[0])) if len(tied) == 1 else int(np.flatnonzero(np.isin(h, tied))[0])
    return (int(doc.ngram_chars(n)[i]) + n - 1) * top


def _repeat_mask(h: np.ndarray) -> np.ndarray:
    """True where an n-gram already occurred earlier in the document."""
    order = np.argsort(h, kind="stable")
    s = h[order]
    repeat_sorted = np.concatenate(([False], s[1:] == s[:-1]))
    mask = np.empty(len(h), dtype=bool)
    mask[order] = repeat_sorted
    return mask


def _duplicate_ngram_chars(doc: Doc, n: int, limit: float, bound: np.ndarray | None) -> tuple[float, np.ndarray]:
    """Characters in repeated n-grams, scanning left to right and jumping n words past each repeat.

    ``bound`` is a superset of the repeated positions (from the (n-1)-gram pass: an n-gram can
    only repeat where both its (n-1)-gram halves repeat). When the characters under it are
    ≤ ``limit`` the greedy scan cannot exceed the limit either and is skipped. Returns the count
    (or that upper bound) and a superset mask for n+1.
    """
    chars = doc.ngram_chars(n)
    if len(chars) == 0:
        return 0.0, np.zeros(0, dtype=bool)
    if bound is not None:
        upper = int(chars[bound].sum())
        if upper <= limit:
            return float(upper), bound[:-1] & bound[1:]
    h = doc.ngram_hashes(n)
    mask = _repeat_mask(h)
    upper = int(chars[mask].sum())
    if upper <= limit:
        return float(upper), mask[:-1] & mask[1:]
    start = int(np.argmax(mask))  # first repeated position; everything before it is new
    hl, cl = h.tolist(), chars.tolist()
    seen = set(hl[:start])
    repeated, idx, m = 0, start, len(hl)
    while idx < m:
        g = hl[idx]
        if g in seen:
            repeated += cl[idx]
            idx += n
        else:
            seen.add(g)
            idx += 1
    return float(repeated), mask[:-1] & mask[1:]


def gopher_repetition(doc: Doc | str, cfg: GopherRepetitionConfig = GopherRepetitionConfig()) -> Verdict:
    """Duplicate paragraphs/lines (count and characters), top 2-4-grams, duplicate 5-10-grams."""
    doc = as_doc(doc)
    text = doc.text
    if not text:
        return False, "gopher_repetition.empty"
    size = len(text)

    for unit, parts, frac, char_frac in (("para", doc.paragraphs, cfg.dup_para_frac, cfg.dup_para_char_frac),
                                         ("line", doc.nl_lines, cfg.dup_line_frac, cfg.dup_line_char_frac)):
        n_dup, dup_chars = duplicate_stats(parts)
        if frac and n_dup / len(parts) > frac:
            return False, f"gopher_repetition.dup_{unit}_frac"
        if char_frac and dup_chars / size > char_frac:
            return False, f"gopher_repetition.dup_{unit}_char_frac"

    n_words = len(doc.words)
    for n, frac in cfg.top_n_grams:
        if n_words < n:
            continue
        if _top_ngram_chars(doc, n) / size > frac:
            return False, f"gopher_repetition.top_{n}_gram"
    bound: np.ndarray | None = None
    prev_n = None
    for n, frac in cfg.dup_n_grams:
        if n_words < n:
            continue
        if prev_n is not None and n != prev_n + 1:
            bound = None  # the superset argument only chains through consecutive n
        repeated, bound = _duplicate_ngram_chars(doc, n, frac * size, bound)
        prev_n = n
        if repeated / size > frac:
            return False, f"gopher_repetition.dup_{n}_gram"
    return True, None
