"""C4's line and document rules (Raffel et al. 2020, and the TFDS c4_utils code), as used by FineWeb.

C4 is not only a filter: it removes lines (too-short lines, lines with "javascript", cookie /
terms-of-use lines, lines with an absurdly long word) and strips Wikipedia-style citations.
Like datatrove's C4QualityFilter, a kept document's text is replaced by its kept lines joined
with "\\n" (``C4Config.rewrite_text``; switch it off to keep the original text and use C4 only
as a yes/no filter). Later rules (FineWeb quality) see the rewritten text.

Sentence counting (for ``min_num_sentences``) uses a rule that approximates spaCy's English
sentencizer: a sentence ends at '.', '!' or '?' that stands as its own token (not "...", not an
abbreviation such as "Dr." or an initial "A.") and is followed by more words on the line.
It is only evaluated until ``min_num_sentences`` is reached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llm.config import C4Config
from llm.data.filters.text import Doc, as_doc

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
TERMINAL = (".", "?", "!", '"', "'")
POLICY_RE = re.compile(r"terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies")
SENTENCE_END_RE = re.compile(
    r"(?<![\s.])(?<!\b[A-Za-z])(?<!\bMr)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bJr)(?<!\bSr)(?<!\bMrs)(?<!\bvs)"
    r"(?:\.(?!\.)|[!?])[.!?]*[^\w\s]*"          # the terminal mark and any closing punctuation
    r"(?:\s+|(?<=\.)(?=[A-Z]))(?=.*\w)"          # then more words on this line
)


def count_sentences(line: str) -> int:
    return 1 + len(SENTENCE_END_RE.findall(line)) if line.strip() else 0


def split_sentences(text: str) -> list[str]:
    out, start = [], 0
    for m in SENTENCE_END_RE.finditer(text):
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s.strip()]


@dataclass(frozen=True)
class C4Result:
    keep: bool
    reason: str | None
    text: str  # the rewritten text when kept (or the original if rewrite_text is off)


def c4_clean(doc: Doc | str, cfg: C4Config = C4Config()) -> C4Result:
    """Apply the C4 line rules and the document rules; return the verdict and the kept text."""
    doc = as_doc(doc)
    text = doc.text
    units = doc.lines if cfg.split_paragraph else split_sentences(text)
    # Document-level gates: a per-line substring check is skipped when the whole text lacks it.
    low = (CITATION_RE.sub("", text) if cfg.remove_citations and "[" in text else text).lower()
    check_lorem = cfg.filter_lorem_ipsum and "lorem ipsum" in low
    check_js = cfg.filter_javascript and "javascript" in low
    check_curly = cfg.filter_curly_bracket and "{" in low
    check_policy = cfg.filter_policy and POLICY_RE.search(low) is not None
    max_word = cfg.max_word_length
    need_sentences = cfg.min_num_sentences

    kept: list[str] = []
    sentences = 0
    for line in units:
        line = line.strip()
        words = line.split()
        if max_word != -1 and len(line) > max_word and max(map(len, words)) > max_word:
            continue
        if cfg.remove_citations and "[" in line:
            line = CITATION_RE.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(TERMINAL) or line.endswith("...")):
            continue
        if len(words) < cfg.min_words_per_line:
            continue
        if check_lorem or check_js or check_policy:
            line_l = line.lower()
            if check_lorem and "lorem ipsum" in line_l:
                return C4Result(False, "c4.lorem_ipsum", text)
            if check_js and "javascript" in line_l:
                continue
        if check_curly and "{" in line:
            return C4Result(False, "c4.curly_bracket", text)
        if check_policy and POLICY_RE.search(line_l):
            continue
        if sentences < need_sentences:
            sentences += count_sentences(line) if cfg.split_paragraph else 1
        kept.append(line)
    if sentences < need_sentences:
        return C4Result(False, "c4.too_few_sentences", text)
    if not cfg.rewrite_text:
        return C4Result(True, None, text)
    return C4Result(True, None, ("\n" if cfg.split_paragraph else " ").join(kept).strip())


def c4_quality(doc: Doc | str, cfg: C4Config = C4Config()) -> tuple[bool, str | None]:
    """The verdict of :func:`c4_clean` without the rewritten text."""
    r = c4_clean(doc, cfg)
    return r.keep, r.reason
