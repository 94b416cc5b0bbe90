"""FineWeb's own quality rules (Penedo et al. 2024, section 3.3), with datatrove's default thresholds.

Four document-level ratios over non-empty lines: lines ending in terminal punctuation, short
lines, characters in duplicated lines, and newlines per word (list-like pages).
"""

from __future__ import annotations

from operator import methodcaller

from llm.config import FineWebQualityConfig
from llm.data.filters.text import Doc, as_doc, duplicate_stats
from llm.data.filters.words import terminal_punctuation

Verdict = tuple[bool, str | None]


def fineweb_quality(doc: Doc | str, cfg: FineWebQualityConfig = FineWebQualityConfig()) -> Verdict:
    doc = as_doc(doc)
    text = doc.text
    lines = list(filter(str.strip, text.split("\n")))
    if not lines:
        return False, "fineweb_quality.empty"
    n = len(lines)

    ratio = sum(map(methodcaller("endswith", terminal_punctuation()), lines)) / n
    if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
        return False, "fineweb_quality.line_punct_ratio"

    if sum(map(cfg.short_line_length.__ge__, map(len, lines))) / n > cfg.short_line_thr:
        return False, "fineweb_quality.short_line_ratio"

    if duplicate_stats(lines)[1] / (len(text) - text.count("\n")) > cfg.char_duplicates_ratio:
        return False, "fineweb_quality.char_dup_ratio"

    newlines = text.count("\n")
    # Every whitespace-separated chunk holds at least one word token, so the cheap chunk count
    # settles most documents without tokenising.
    if newlines > cfg.new_line_ratio * len(text.split()) and newlines / len(doc.words) > cfg.new_line_ratio:
        return False, "fineweb_quality.list_ratio"
    return True, None
