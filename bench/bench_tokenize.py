"""Tokenize-to-shards throughput vs raw tiktoken ``encode_ordinary_batch`` on the same text and encoding.

    .venv/bin/python bench/bench_tokenize.py --mb 40 --procs 1 2

Ours: the whole tokenize stage path (``llm.data.tokenize.tokenize_docs``): read parquet row groups,
split by id hash, encode in ``N`` worker processes with tiktoken's batch API, lay out BOS-prefixed
streams and write the shards + index. Process start-up (spawn) is included.
Also timed: the same stage with ``encode_method="batch"`` (lists from ``encode_ordinary_batch``
instead of ``encode_to_numpy`` buffers), to show what the numpy path buys.
Reference: ``Encoding.encode_ordinary_batch(texts, num_threads=N)`` on the same texts already in
memory, results discarded: pure encoding, no I/O. MB = UTF-8 megabytes of document text.
Each figure is the best of ``--repeat`` runs (the machine may be shared). MB/CPU-s divides by the CPU
time of all threads and worker processes: robust to other load on the machine, where wall-clock
MB/s is not.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.data.tokenize import tokenize_docs  # noqa: E402
from llm.stages.output import run_stage  # noqa: E402
from llm.storage import Store  # noqa: E402
from llm.data.tokenizer import train_tokenizer  # noqa: E402
from llm.tokenizer import load_tokenizer  # noqa: E402


def load_docs(data_dir: Path, mb: float) -> list[dict]:
    rows, size = [], 0
    for shard in sorted((data_dir / "pretrain").glob("*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=1024, columns=["text", "id"]):
            for r in batch.to_pylist():
                rows.append(r)
                size += len(r["text"].encode("utf-8"))
                if size >= mb * 1e6:
                    return rows
    return rows


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus reaped children (the worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(n: int, fn) -> tuple[float, float]:
    """(best wall seconds, least CPU seconds) over ``n`` runs."""
    walls, cpus = [], []
    for _ in range(n):
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--mb", type=float, default=40.0, help="MB of document text to encode")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--train-mb", type=float, default=10.0, help="MB of that text used to train the BPE")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        docs = load_docs(args.data, args.mb)
        texts = [d["text"] for d in docs]
        nbytes = sum(len(t.encode("utf-8")) for t in texts)

        def publish(out, inputs):
            for i in range(0, len(docs), 2048):  # ~shard-sized files with 1024-row groups, like the kit
                pq.write_table(pa.Table.from_pylist(docs[i : i + 2048]), out.path(f"data/part_{i // 2048:05d}.parquet"),
                               row_group_size=1024)
            return {"counts": {"docs_out": len(docs)}}

        docs_uri = run_stage(Store(str(work)), "dedup", {"bench": True}, {}, "bench", publish).uri
        t0 = time.perf_counter()
        train_texts, size = [], 0
        for t in texts:
            train_texts.append(t[:10_000])
            size += len(train_texts[-1])
            if size >= args.train_mb * 1e6:
                break
        tok, _ = train_tokenizer(train_texts, args.vocab)
        tok.save(work / "tok")
        print(f"trained BPE vocab={tok.vocab_size} on {size / 1e6:.1f} M chars in {time.perf_counter() - t0:.1f}s")
        enc = load_tokenizer(str(work / "tok")).encoding
        n_tokens = sum(len(x) for x in enc.encode_ordinary_batch(texts, num_threads=2))
        print(f"corpus: {len(texts)} docs, {nbytes / 1e6:.1f} MB, {n_tokens / 1e6:.2f} M tokens")
        print()
        print(f"load average before timing: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print()
        print("| processes | raw tiktoken MB/s | kiln stage MB/s | wall ratio | raw MB/CPU-s | kiln MB/CPU-s | CPU ratio "
              "| kiln, encode_method=batch MB/s | wall ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in args.procs:
            ref, ref_cpu = best_of(args.repeat, lambda: enc.encode_ordinary_batch(texts, num_threads=n))

            def ours(method: str) -> None:
                out = work / f"out{n}"
                shutil.rmtree(out, ignore_errors=True)
                meta = tokenize_docs(docs_uri, str(work / "tok"), str(out), val_fraction=0.01,
                                     shard_tokens=100_000_000, workers=n, batch_docs=1024, encode_method=method)
                tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
                assert tokens == n_tokens + len(texts), (tokens, n_tokens)  # exact: + one BOS per doc

            fast, fast_cpu = best_of(args.repeat, lambda: ours("numpy"))
            lists, _ = best_of(args.repeat, lambda: ours("batch"))
            mb = nbytes / 1e6
            print(f"| {n} | {mb / ref:.2f} | {mb / fast:.2f} | {ref / fast:.2f}x | {mb / ref_cpu:.2f} | {mb / fast_cpu:.2f} "
                  f"| {ref_cpu / fast_cpu:.2f}x | {mb / lists:.2f} | {ref / lists:.2f}x |", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
