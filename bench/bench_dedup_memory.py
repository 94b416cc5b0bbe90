"""Dedup memory: peak RSS per worker as the corpus grows 10x (goal: flat).

Each corpus size runs in a fresh interpreter (so ``ru_maxrss`` is that run's own peak) with a
fixed number of shards, so the shards themselves grow 10x: flat worker memory then shows
that the workers stream row groups rather than load their shard. The coordinator (the parent
process: band tables one at a time + union-find over candidates) is reported too; it is the
one part that grows with the corpus, by design (about 16 bytes x docs / band_partitions).

Documents are real ones from the offline kit; beyond the kit's size they are replicated with
20% of their words replaced, so the corpus grows without becoming one big duplicate cluster.

    python bench/bench_dedup_memory.py --sizes 1000,10000 --shards 2 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("KILN_DATA_MIRROR") or REPO.parent / "shared" / "data") / "pretrain"  # the offline kit


def build(out: Path, n_docs: int, shards: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    real = pa.concat_tables([pq.read_table(f, columns=["text", "id"]) for f in sorted(DATA.glob("*.parquet"))]).to_pylist()
    rows = []
    for k in range(n_docs):
        src = real[k % len(real)]
        text = src["text"]
        if k >= len(real):  # replica: perturb 20% of words so it is a new document
            words = text.split(" ")
            for i in rng.sample(range(len(words)), max(1, len(words) // 5)):
                words[i] = f"w{rng.randrange(10**6)}"
            text = " ".join(words)
        rows.append({"text": text, "id": f"{src['id']}#{k // len(real)}"})
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s::shards]), out / f"shard_{s:05d}.parquet", row_group_size=256)


def one(corpus: Path, workers: int, partitions: int, executor: str = "local") -> dict:
    """Run the dedup stage on ``corpus`` in this (fresh) process; return the memory figures."""
    from llm.config import load_config
    from llm.data.dedup import peak_rss_mb
    from llm.stages.output import run_stage
    from llm.stages.registry import execute
    from llm.storage import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench_dedup_mem_"))
    try:
        base_rss = peak_rss_mb()

        def publish(out, _):
            for f in sorted(corpus.glob("*.parquet")):
                shutil.copyfile(f, out.path(f"data/{f.name}"))
            return {}

        store = Store(str(tmp / "art"))
        uri = run_stage(store, "filter", {"corpus": str(corpus)}, {}, "bench", publish).uri
        cfg = load_config("tiny", [f"run.artifact_root={tmp / 'art'}", f"dedup.workers={workers}",
                                   f"dedup.band_partitions={partitions}", f"run.executor={executor}"])
        res = execute("dedup", cfg, {"docs": uri}, progress=False)
        mem = res.manifest["dedup"]["memory"]
        return {
            "docs": res.manifest["counts"]["docs_in"], "shards": res.manifest["counts"]["shards_in"], "workers": workers,
            "band_partitions": partitions, "executor": executor,
            "signature_worker_peak_rss_mb": mem["signature_worker_peak_rss_mb"],
            "filter_worker_peak_rss_mb": mem["filter_worker_peak_rss_mb"],
            "coordinator_peak_rss_mb": round(peak_rss_mb(), 1),
            "coordinator_rss_before_stage_mb": round(base_rss, 1),
            "largest_band_table_rows": mem["largest_band_table_rows"],
            "union_find_ids": mem["union_find_ids"],
            "docs_out": res.manifest["counts"]["docs_out"],
            "seconds": res.manifest["timings"]["seconds"],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--band-partitions", type=int, default=1)
    ap.add_argument("--executor", default="local", help="run.executor: local, dask or dask://HOST:PORT")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run on one corpus dir, print JSON
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(Path(args.one), args.workers, args.band_partitions, args.executor)), flush=True)
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        corpus = Path(tempfile.mkdtemp(prefix="bench_dedup_corpus_"))
        try:
            build(corpus, n, args.shards)
            cmd = [sys.executable, __file__, "--one", str(corpus), "--workers", str(args.workers),
                   "--band-partitions", str(args.band_partitions), "--executor", args.executor]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            shutil.rmtree(corpus, ignore_errors=True)
        if proc.returncode:
            sys.exit(f"run for {n} docs failed:\n{proc.stderr[-3000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT "):]))
        r = rows[-1]
        print(f"{r['docs']:>7} docs  signature worker {r['signature_worker_peak_rss_mb']:7.1f} MB  "
              f"filter worker {r['filter_worker_peak_rss_mb']:7.1f} MB  coordinator {r['coordinator_peak_rss_mb']:7.1f} MB "
              f"(imports only {r['coordinator_rss_before_stage_mb']:.1f})  band table rows {r['largest_band_table_rows']}  "
              f"{r['seconds']:.1f}s", flush=True)
    first, last = rows[0], rows[-1]
    growth = last["docs"] / first["docs"]
    for key in ("signature_worker_peak_rss_mb", "filter_worker_peak_rss_mb", "coordinator_peak_rss_mb"):
        print(f"{key}: x{last[key] / first[key]:.2f} for x{growth:.0f} documents")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
