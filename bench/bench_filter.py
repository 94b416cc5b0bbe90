"""Filter throughput: Kiln's FineWeb-recipe filters vs datatrove's, same thresholds, same documents.

    .venv/bin/python bench/bench_filter.py [--docs 2000] [--shard PATH ...]

``--docs 0`` takes every document of the given shards (``--shard ../shared/data/pretrain/*.parquet``
for the whole kit, about 15 minutes of datatrove on a quiet machine).

Both run single-process over the same documents, in FineWeb's order (Gopher repetition ->
Gopher quality -> C4 -> FineWeb quality; C4's rewritten text feeds FineWeb quality). For
datatrove we call each filter's ``filter()`` directly, which skips its pipeline bookkeeping
(in its favour). Its English word tokeniser is spaCy's blank "en" pipeline, which needs
``spacy`` installed (no model download). Prints docs/s for both (wall clock, and CPU time of
this process, which other jobs on a shared machine disturb less), the ratios, the agreement
of keep/drop decisions, and where the two disagree. The default shard is in the data kit
(``$KILN_DATA_MIRROR``, else ``../shared/data``).
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

import pyarrow.parquet as pq

from llm.config import FilterConfig
from llm.data.filters import FilterChain

DATA = Path(os.environ.get("KILN_DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data")
SHARD = DATA / "pretrain" / "shard_00000.parquet"


def load_docs(paths: list[Path], n: int) -> list[dict]:
    """The first ``n`` documents of the shards in order (all of them when ``n`` is 0)."""
    rows: list[dict] = []
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["id", "url", "text"]):
            rows.extend(batch.to_pylist())
            if n and len(rows) >= n:
                return rows[:n]
    return rows


def datatrove_chain(cfg: FilterConfig):
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    gq, gr, c4, fw = cfg.gopher_quality, cfg.gopher_repetition, cfg.c4, cfg.fineweb_quality
    filters = [
        GopherRepetitionFilter(dup_line_frac=gr.dup_line_frac, dup_para_frac=gr.dup_para_frac,
                               dup_line_char_frac=gr.dup_line_char_frac, dup_para_char_frac=gr.dup_para_char_frac,
                               top_n_grams=tuple(gr.top_n_grams), dup_n_grams=tuple(gr.dup_n_grams)),
        GopherQualityFilter(min_doc_words=gq.min_doc_words, max_doc_words=gq.max_doc_words,
                            min_avg_word_length=gq.min_avg_word_length, max_avg_word_length=gq.max_avg_word_length,
                            max_symbol_word_ratio=gq.max_symbol_word_ratio, max_bullet_lines_ratio=gq.max_bullet_lines_ratio,
                            max_ellipsis_lines_ratio=gq.max_ellipsis_lines_ratio,
                            max_non_alpha_words_ratio=gq.max_non_alpha_words_ratio, min_stop_words=gq.min_stop_words),
        C4QualityFilter(split_paragraph=c4.split_paragraph, remove_citations=c4.remove_citations,
                        filter_no_terminal_punct=c4.filter_no_terminal_punct, min_num_sentences=c4.min_num_sentences,
                        min_words_per_line=c4.min_words_per_line, max_word_length=c4.max_word_length,
                        filter_lorem_ipsum=c4.filter_lorem_ipsum, filter_javascript=c4.filter_javascript,
                        filter_curly_bracket=c4.filter_curly_bracket, filter_policy=c4.filter_policy),
        FineWebQualityFilter(line_punct_thr=fw.line_punct_thr, line_punct_exclude_zero=fw.line_punct_exclude_zero,
                             short_line_thr=fw.short_line_thr, short_line_length=fw.short_line_length,
                             char_duplicates_ratio=fw.char_duplicates_ratio, new_line_ratio=fw.new_line_ratio),
    ]
    names = ["gopher_repetition", "gopher_quality", "c4", "fineweb_quality"]

    def run(row: dict) -> str | None:
        doc = Document(text=row["text"], id=str(row["id"]), metadata={"url": row.get("url")})
        for name, f in zip(names, filters):
            r = f.filter(doc)
            if r is not True:
                return f"{name}.{r[1] if isinstance(r, tuple) else 'drop'}"
        return None

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000, help="documents to run (0: every one in the shards)")
    ap.add_argument("--shard", type=Path, nargs="+", default=[SHARD])
    ap.add_argument("--chunk", type=int, default=50, help="documents per interleaved timing chunk")
    ap.add_argument("--show", type=int, default=0, help="print this many disagreeing document ids")
    args = ap.parse_args()

    cfg = FilterConfig()
    docs = load_docs(args.shard, args.docs)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs)} documents, {chars / 1e6:.1f} M characters from {', '.join(p.name for p in args.shard)}")

    ours = FilterChain(cfg)
    theirs = datatrove_chain(cfg)
    ours("warm up the regex caches. " * 20)
    theirs({"text": "warm up spaCy's tokenizer. " * 20, "id": "w"})
    # Interleave the two in chunks so a change in machine load hits both alike.
    our_reasons: list[str | None] = []
    their_reasons: list[str | None] = []
    t_ours = t_theirs = c_ours = c_theirs = 0.0
    for start in range(0, len(docs), args.chunk):
        chunk = docs[start : start + args.chunk]
        t0, c0 = time.perf_counter(), time.process_time()
        our_reasons.extend(ours(d["text"], d.get("url")).reason for d in chunk)
        t1, c1 = time.perf_counter(), time.process_time()
        their_reasons.extend(theirs(d) for d in chunk)
        t2, c2 = time.perf_counter(), time.process_time()
        t_ours += t1 - t0
        t_theirs += t2 - t1
        c_ours += c1 - c0
        c_theirs += c2 - c1

    agree = sum((a is None) == (b is None) for a, b in zip(our_reasons, their_reasons))
    kept_ours = sum(r is None for r in our_reasons)
    kept_theirs = sum(r is None for r in their_reasons)
    print(f"kiln:      {len(docs) / t_ours:8.1f} docs/s  ({t_ours:.2f} s, CPU {c_ours:.2f} s, kept {kept_ours})")
    print(f"datatrove: {len(docs) / t_theirs:8.1f} docs/s  ({t_theirs:.2f} s, CPU {c_theirs:.2f} s, kept {kept_theirs})")
    print(f"speed-up:  {t_theirs / t_ours:.2f}x wall, {c_theirs / c_ours:.2f}x CPU")
    print(f"keep/drop agreement: {agree / len(docs):.2%} ({len(docs) - agree} of {len(docs)} differ)")
    diff = collections.Counter((a, b) for a, b in zip(our_reasons, their_reasons) if (a is None) != (b is None))
    for (a, b), n in diff.most_common(12):
        print(f"  kiln={a or 'keep'} datatrove={b or 'keep'}: {n}")
    if args.show:
        shown = [(d["id"], a, b) for d, a, b in zip(docs, our_reasons, their_reasons) if (a is None) != (b is None)]
        for row in shown[: args.show]:
            print("  ", *row)


if __name__ == "__main__":
    main()
