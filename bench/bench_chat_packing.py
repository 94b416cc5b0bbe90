"""SFT packing efficiency and loader speed on the offline chat set.

Compares Kiln's best-fit packing (``llm.train.chat_loaders.SFTStream``) with the padded reference most SFT
scripts use (nanochat's included): one conversation per row, padded to the longest conversation of its
batch. Reports the share of row positions holding real tokens, supervised targets per row, and rows
per optimizer step needed for one epoch; then the loaders' rows/s.

    .venv/bin/python bench/bench_chat_packing.py [--rows 5000] [--seq-len 2048] [--vocab 32768]

The tokenizer is a BPE trained here on the chat text itself (vocab ``--vocab``), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from llm.chat.format import DropReport, render_many
from llm.chat.sources import load_conversations
from llm.train.chat_loaders import SFTStream
from llm.data.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat" / "train.parquet"


def padded_reference(lengths: np.ndarray, batch: int, cap: int) -> tuple[int, int, int]:
    """(rows, positions, real tokens) for one conversation per row, padded to the batch's longest."""
    rows = positions = real = 0
    for i in range(0, len(lengths), batch):
        ls = np.minimum(lengths[i:i + batch], cap)
        rows += len(ls)
        positions += len(ls) * int(ls.max())
        real += int(ls.sum())
    return rows, positions, real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    convs, report, _ = load_conversations(str(DATA), max_rows=a.rows, max_chars=20_000, name="train")
    tok, _ = train_tokenizer((m["content"] for c in convs[:3000] for m in c), a.vocab)
    t0 = time.time()
    rendered = render_many(tok, convs, vocab_size=tok.vocab_size, max_tokens=a.seq_len + 1,
                           report=DropReport(rows_in=len(convs), rows_kept=len(convs)))
    t_render = time.time() - t0
    lengths = rendered.lengths()
    T = a.seq_len

    stream = SFTStream(rendered, seq_len=T, seed=0, pad_id=tok.bos_id)
    t0 = time.time()
    rows = stream.epoch_rows(0)
    t_pack = time.time() - t0
    kiln_rows, kiln_real = len(rows), int(lengths.sum())
    ref_rows, ref_pos, ref_real = padded_reference(lengths, a.batch, T + 1)

    t0 = time.time()
    n = min(2000, kiln_rows)
    for _ in range(n):
        stream.next_row()
    rows_per_s = n / (time.time() - t0)

    kiln_fill = kiln_real / (kiln_rows * (T + 1))
    ref_fill = ref_real / ref_pos
    print(f"conversations {len(rendered):,} ({int(lengths.sum()):,} tokens, mean {lengths.mean():.0f}, "
          f"max {lengths.max()}); rendered in {t_render:.1f}s")
    print(f"best-fit (kiln): {kiln_rows:,} rows of {T + 1} tokens, {kiln_fill:.1%} real tokens; packed in {t_pack:.2f}s; "
          f"{rows_per_s:,.0f} rows/s materialised")
    print(f"padded (reference, batch {a.batch}): {ref_rows:,} rows, {ref_fill:.1%} real tokens of the padded positions")
    kiln_pos = kiln_rows * (T + 1)
    print(f"positions computed per epoch: kiln {kiln_pos:,} vs reference {ref_pos:,} -> "
          f"reference/kiln = {ref_pos / kiln_pos:.2f}x (real-token share kiln/reference = {kiln_fill / ref_fill:.2f}x)")


if __name__ == "__main__":
    main()
