"""Dedup throughput and recall: Kiln's dedup stage vs datatrove's MinHash pipeline, same documents.

Both run word 5-gram MinHash with 112 hashes as 14 bands x 8 rows, seed 1, end to end from
parquet shards to deduplicated parquet shards (datatrove: signatures -> buckets -> cluster ->
filter with LocalPipelineExecutor; Kiln: the `dedup` stage). The corpus is real documents from
the offline kit with planted near-duplicates (0.2-3% of words replaced) and a few planted
exact copies. Recall counts a planted pair as found when the output no longer holds both.

datatrove's default English word tokenizer is spaCy, which is not a Kiln dependency; the
default here gives datatrove a whitespace tokenizer (the cheapest one, and the same words as
Kiln's normalisation produces). `--datatrove-tokenizer spacy` uses its stock tokenizer
(needs spaCy importable: `make bench` installs the `bench` extra; or `--extra-site DIR` holding a
`pip install --target DIR spacy`).

    python bench/bench_dedup.py --docs 3000 --workers 1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
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

from llm.config import load_config  # noqa: E402
from llm.data.minhash import jaccard, normalize, shingles  # noqa: E402
from llm.stages.output import run_stage  # noqa: E402
from llm.stages.registry import execute  # noqa: E402
from llm.storage import Store  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"
FILLER = ["lorem", "ipsum", "dolor", "amet", "quux", "zebra", "orbit", "velvet", "harbor", "copper"]


def perturb(text: str, frac: float, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[i] = rng.choice(FILLER)
    return " ".join(words)


def build_corpus(out_dir: Path, n_docs: int, near_frac: float, exact_frac: float, shards: int, seed: int,
                 data_dir: Path = DATA) -> tuple[list[dict], int]:
    """Write ``shards`` parquet files; return the planted pairs (src id, copy id, jaccard)."""
    rng = random.Random(seed)
    per = -(-n_docs // 4)
    base = pa.concat_tables([pq.read_table(data_dir / f"shard_{i:05d}.parquet", columns=["text", "id"]).slice(0, per)
                             for i in range(4)]).slice(0, n_docs)
    rows = base.to_pylist()
    eligible = [i for i, r in enumerate(rows) if len(r["text"].split()) >= 100]
    n_near, n_exact = int(n_docs * near_frac), int(n_docs * exact_frac)
    picks = rng.sample(eligible, n_near + n_exact)
    plants, copies = [], []
    for k, i in enumerate(picks):
        src = rows[i]
        if k < n_near:
            text = perturb(src["text"], rng.uniform(0.002, 0.03), rng)
            j = jaccard(shingles(normalize(src["text"]), 5), shingles(normalize(text), 5))
            kind = "near"
        else:
            text, j, kind = src["text"], 1.0, "exact"
        copy_id = f"{kind}-{k}"
        copies.append({"text": text, "id": copy_id})
        plants.append({"src": src["id"], "copy": copy_id, "jaccard": j, "kind": kind})
    allrows = rows + copies
    rng.shuffle(copies)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = allrows[s::shards]
        pq.write_table(pa.Table.from_pylist(part), out_dir / f"shard_{s:05d}.parquet", row_group_size=1024)
    return plants, len(allrows)


class Clock:
    """Wall time and CPU time (this process + finished children): CPU is robust to a busy machine."""

    def __enter__(self) -> "Clock":
        self.w0 = time.perf_counter()
        self.c0 = self._cpu()
        return self

    @staticmethod
    def _cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = self._cpu() - self.c0


def output_ids(folder: Path) -> set[str]:
    return {i for f in sorted(folder.rglob("*.parquet")) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}


def run_kiln(corpus: Path, work: Path, workers: int, seed: int = 1) -> tuple[Clock, set[str], dict]:
    store = Store(str(work))

    def publish(out, _):
        for f in sorted(corpus.glob("*.parquet")):
            shutil.copyfile(f, out.path(f"data/{f.name}"))
        return {}

    uri = run_stage(store, "filter", {"corpus": str(corpus)}, {}, "bench", publish).uri
    cfg = load_config("tiny", [f"run.artifact_root={work}", f"dedup.workers={workers}", f"dedup.seed={seed}"])
    with Clock() as clock:
        res = execute("dedup", cfg, {"docs": uri}, progress=False, force=True)
    return clock, output_ids(Path(res.uri) / "data"), res.manifest


def xxh64_str(text: str) -> int:
    """datatrove 0.10.1's xxhash wrapper passes str, which xxhash >= 4 rejects; encode first."""
    import xxhash

    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def run_datatrove(corpus: Path, work: Path, workers: int, tokenizer: str, hash_fc: str,
                  seed: int = 1) -> tuple[Clock, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    language = WhitespaceWords() if tokenizer == "whitespace" else "eng"
    from datatrove.utils.hashing import HashConfig

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=seed, hash_config=HashConfig(hash_fc=hash_fc))
    signer = MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg, language=language)
    if hash_fc == "xxhash":
        signer._hash_func = xxh64_str
    n_files = len(list(corpus.glob("*.parquet")))
    logs = work / "logs"

    def ex(pipeline, tasks, name):
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                     logging_dir=str(logs / name), skip_completed=False)

    with Clock() as clock:
        ex([ParquetReader(str(corpus), text_key="text", id_key="id"),
            signer], n_files, "sigs").run()
        ex([MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=cfg)],
           cfg.num_buckets, "buckets").run()
        ex([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=cfg)],
           1, "cluster").run()
        ex([ParquetReader(str(corpus), text_key="text", id_key="id"),
            MinhashDedupFilter(input_folder=str(work / "remove")),
            ParquetWriter(str(work / "out"))], n_files, "filter").run()
    return clock, output_ids(work / "out")


def recall(plants: list[dict], kept: set[str], lo: float, hi: float = 1.01, kind: str = "near") -> tuple[int, int]:
    sel = [p for p in plants if p["kind"] == kind and lo <= p["jaccard"] < hi]
    found = sum(1 for p in sel if not (p["src"] in kept and p["copy"] in kept))
    return found, len(sel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000, help="real documents before planting")
    ap.add_argument("--near-frac", type=float, default=0.1)
    ap.add_argument("--exact-frac", type=float, default=0.02)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1, help="processes for both systems")
    ap.add_argument("--repeats", type=int, default=2, help="best of N (alternating runs)")
    ap.add_argument("--datatrove-tokenizer", choices=["whitespace", "spacy"], default="whitespace")
    ap.add_argument("--datatrove-hash", choices=["xxhash", "sha1"], default="xxhash",
                    help="datatrove's shingle hash (its default is xxhash, 64-bit)")
    ap.add_argument("--extra-site", default="", help="a directory appended to sys.path (e.g. where spaCy is)")
    ap.add_argument("--json", default="", help="write the results here too")
    ap.add_argument("--recall-seeds", type=int, default=0,
                    help="also sum recall over MinHash seeds 1..N for both systems: one seed's 2-3 misses at "
                         "J~0.85 are luck (14x8 catches 98.8%% of pairs there), N seeds compare the methods")
    args = ap.parse_args()
    if args.extra_site:
        sys.path.append(args.extra_site)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    try:
        from datatrove.utils.logging import logger as dt_logger

        dt_logger.remove()
    except Exception:  # noqa: BLE001 - quieter logs are a nicety
        pass

    tmp = Path(tempfile.mkdtemp(prefix="bench_dedup_"))
    try:
        plants, n_total = build_corpus(tmp / "corpus", args.docs, args.near_frac, args.exact_frac, args.shards, seed=0)
        results: dict[str, list[Clock]] = {"kiln": [], "datatrove": []}
        kept: dict[str, set[str]] = {}
        manifest: dict = {}
        for r in range(args.repeats):
            for system in (["kiln", "datatrove"] if r % 2 == 0 else ["datatrove", "kiln"]):
                work = tmp / f"{system}_{r}"
                if system == "kiln":
                    clock, kept["kiln"], manifest = run_kiln(tmp / "corpus", work, args.workers)
                else:
                    clock, kept["datatrove"] = run_datatrove(tmp / "corpus", work, args.workers, args.datatrove_tokenizer,
                                                                  args.datatrove_hash)
                results[system].append(clock)
                print(f"  run {r} {system:<9} wall {clock.wall:7.2f}s  cpu {clock.cpu:7.2f}s", flush=True)
                shutil.rmtree(work, ignore_errors=True)
        best = {s: min(c, key=lambda c: c.wall) for s, c in results.items()}
        best_cpu = {s: min(c.cpu for c in cs) for s, cs in results.items()}
        out = {"docs": n_total, "workers": args.workers, "datatrove_tokenizer": args.datatrove_tokenizer,
               "datatrove_hash": args.datatrove_hash}
        print(f"\n{n_total} docs ({args.docs} real + {len(plants)} planted copies), {args.shards} shards, "
              f"workers={args.workers}, datatrove tokenizer={args.datatrove_tokenizer}, hash={args.datatrove_hash}")
        print(f"{'system':<10} {'docs/s (wall)':>14} {'docs/s (cpu)':>13} {'removed':>8} "
              f"{'recall J>=0.85':>15} {'recall 0.75-0.85':>17} {'exact':>7}")
        for s in ("kiln", "datatrove"):
            f85, n85 = recall(plants, kept[s], 0.85)
            fmid, nmid = recall(plants, kept[s], 0.75, 0.85)
            fex, nex = recall(plants, kept[s], 0.0, kind="exact")
            row = {"wall_s": round(best[s].wall, 3), "cpu_s": round(best_cpu[s], 3),
                   "docs_per_s_wall": round(n_total / best[s].wall, 1), "docs_per_s_cpu": round(n_total / best_cpu[s], 1),
                   "removed": n_total - len(kept[s]), "recall_ge_085": [f85, n85], "recall_075_085": [fmid, nmid],
                   "recall_exact": [fex, nex]}
            out[s] = row
            print(f"{s:<10} {row['docs_per_s_wall']:>14.1f} {row['docs_per_s_cpu']:>13.1f} {row['removed']:>8} "
                  f"{f85:>6}/{n85:<4} {f85 / max(n85, 1):>5.1%} {fmid:>6}/{nmid:<4} {fmid / max(nmid, 1):>5.1%} {fex:>3}/{nex}")
        out["speedup_wall"] = round(best["datatrove"].wall / best["kiln"].wall, 2)
        out["speedup_cpu"] = round(best_cpu["datatrove"] / best_cpu["kiln"], 2)
        out["kiln_phase_seconds"] = manifest.get("dedup", {}).get("phase_seconds")
        print(f"\nspeedup kiln / datatrove: {out['speedup_wall']:.2f}x wall, {out['speedup_cpu']:.2f}x cpu (goal >= 3x)")
        print(f"kiln phases (last run): {out['kiln_phase_seconds']}")
        if args.recall_seeds:
            totals = {s: [0, 0] for s in ("kiln", "datatrove")}
            for seed in range(1, args.recall_seeds + 1):
                for s in totals:
                    work = tmp / f"{s}_seed{seed}"
                    if s == "kiln":
                        _, ids, _ = run_kiln(tmp / "corpus", work, args.workers, seed)
                    else:
                        _, ids = run_datatrove(tmp / "corpus", work, args.workers, args.datatrove_tokenizer,
                                               args.datatrove_hash, seed)
                    f85, n85 = recall(plants, ids, 0.85)
                    totals[s][0] += f85
                    totals[s][1] += n85
                    shutil.rmtree(work, ignore_errors=True)
            out["recall_ge_085_over_seeds"] = {s: t for s, t in totals.items()}
            print(f"\nrecall at J >= 0.85 summed over seeds 1..{args.recall_seeds}: " + ", ".join(
                f"{s} {f}/{n} ({f / max(n, 1):.2%})" for s, (f, n) in totals.items()))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
