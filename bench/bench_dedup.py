"""Dedup throughput and recall: Kiln's dedup stage vs datatrove's MinHash pipeline, same documents.

Both run word 5-gram MinHash with 112 hashes as 14 bands x 8 rows, seed 1, end to end from
parquet shards to deduplicated parquet shards (datatrove: signatures -> buckets -> cluster ->
filter with LocalPipelineExecutor; Kiln: the `dedup` stage). The corpus is real documents from
the offline kit with planted near-duplicates (0.2-3% of words replaced) and a few planted
exact copies, and (``--low-frac``) copies with 4-20% of words replaced, whose 5-gram Jaccard
with their source is 0.25-0.75: pairs a dedup should keep. A planted pair counts as removed
when the output no longer holds both; per Jaccard band that is recall (J >= 0.8) or false
removal (J < 0.6). Kiln runs with candidate verification (the default, ``dedup.verify``) and
without it (plain 14x8 LSH + union-find, like datatrove), interleaved with datatrove.

datatrove's default English word tokenizer is spaCy, which is not a Kiln dependency; the
default here gives datatrove a whitespace tokenizer (the cheapest one, and the same words as
Kiln's normalisation produces). `--datatrove-tokenizer spacy` uses its stock tokenizer
(needs spaCy importable: `make bench` installs the `bench` extra; or `--extra-site DIR` holding a
`pip install --target DIR spacy`).

    python bench/bench_dedup.py --docs 3000 --workers 1 --repeats 2
    python bench/bench_dedup.py --docs 3000 --repeats 1 --low-frac 0.3 --systems kiln,kiln-noverify,datatrove
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
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

# The offline kit: $KILN_DATA_MIRROR if set (a worktree is not next to shared/), else ../shared/data.
DATA = Path(os.environ.get("KILN_DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data") / "pretrain"
FILLER = ["lorem", "ipsum", "dolor", "amet", "quux", "zebra", "orbit", "velvet", "harbor", "copper"]


def perturb(text: str, frac: float, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[i] = rng.choice(FILLER)
    return " ".join(words)


def build_corpus(out_dir: Path, n_docs: int, near_frac: float, exact_frac: float, shards: int, seed: int,
                 data_dir: Path = DATA, low_frac: float = 0.0) -> tuple[list[dict], int]:
    """Write ``shards`` parquet files; return the planted pairs (src id, copy id, jaccard)."""
    rng = random.Random(seed)
    per = -(-n_docs // 4)
    base = pa.concat_tables([pq.read_table(data_dir / f"shard_{i:05d}.parquet", columns=["text", "id"]).slice(0, per)
                             for i in range(4)]).slice(0, n_docs)
    rows = base.to_pylist()
    # A source must be unique in the kit (by normalised text): a few kit documents are exact copies of
    # one another, and a dedup rightly removes those, which would read as a false removal of the pair.
    seen = Counter(normalize(r["text"]) for r in rows)
    eligible = [i for i, r in enumerate(rows) if len(r["text"].split()) >= 100 and seen[normalize(r["text"])] == 1]
    n_near, n_exact, n_low = int(n_docs * near_frac), int(n_docs * exact_frac), int(n_docs * low_frac)
    picks = rng.sample(eligible, min(len(eligible), n_near + n_exact + n_low))
    plants, copies = [], []
    for k, i in enumerate(picks):
        src = rows[i]
        if k < n_near or k >= n_near + n_exact:  # near (0.2-3% replaced) or low (4-20% replaced)
            text = perturb(src["text"], rng.uniform(0.002, 0.03) if k < n_near else rng.uniform(0.04, 0.2), rng)
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


def run_kiln(corpus: Path, work: Path, workers: int, seed: int = 1, verify: bool = True) -> tuple[Clock, set[str], dict]:
    store = Store(str(work))

    def publish(out, _):
        for f in sorted(corpus.glob("*.parquet")):
            shutil.copyfile(f, out.path(f"data/{f.name}"))
        return {}

    uri = run_stage(store, "filter", {"corpus": str(corpus)}, {}, "bench", publish).uri
    cfg = load_config("tiny", [f"run.artifact_root={work}", f"dedup.workers={workers}", f"dedup.seed={seed}",
                                  f"dedup.verify={str(verify).lower()}"])
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
    """(planted pairs in [lo, hi) that no longer both survive, planted pairs in [lo, hi))."""
    sel = [p for p in plants if p["kind"] == kind and lo <= p["jaccard"] < hi]
    found = sum(1 for p in sel if not (p["src"] in kept and p["copy"] in kept))
    return found, len(sel)


# Jaccard bands the report splits planted pairs into: removal is a false removal below 0.6
# (goal <= 1%), recall at 0.9 and above (goal >= 0.99).
BANDS = [(0.0, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 1.01)]
SYSTEMS = ("kiln", "kiln-noverify", "datatrove")


def run_system(system: str, corpus: Path, work: Path, args: argparse.Namespace, seed: int = 1) -> tuple[Clock, set[str], dict]:
    if system == "datatrove":
        clock, ids = run_datatrove(corpus, work, args.workers, args.datatrove_tokenizer, args.datatrove_hash, seed)
        return clock, ids, {}
    return run_kiln(corpus, work, args.workers, seed, verify=system == "kiln")


def band_table(plants: list[dict], kept: set[str]) -> dict[str, list[int]]:
    return {f"{lo:.2f}-{min(hi, 1.0):.2f}": list(recall(plants, kept, lo, hi)) for lo, hi in BANDS}


def summarise(system: str, clocks: list[Clock], n_total: int, plants: list[dict], kept: set[str]) -> dict:
    wall, cpu = min(c.wall for c in clocks), min(c.cpu for c in clocks)
    fex, nex = recall(plants, kept, 0.0, kind="exact")
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "docs_per_s_wall": round(n_total / wall, 1),
            "docs_per_s_cpu": round(n_total / cpu, 1), "removed": n_total - len(kept),
            "recall_ge_085": list(recall(plants, kept, 0.85)), "recall_exact": [fex, nex],
            "removed_by_jaccard": band_table(plants, kept)}


def print_summary(out: dict, systems: list[str]) -> None:
    heads = [f"{lo:.2f}-{min(hi, 1.0):.2f}" for lo, hi in BANDS]
    print(f"{'system':<14} {'docs/s wall':>11} {'docs/s cpu':>10} {'removed':>8} "
          + " ".join(f"{h:>15}" for h in heads) + f" {'exact':>7}")
    for s in systems:
        row = out[s]
        cells = []
        for h in heads:
            f, n = row["removed_by_jaccard"][h]
            cells.append(f"{f:>4}/{n:<4} {f / max(n, 1):>5.1%}")
        fex, nex = row["recall_exact"]
        print(f"{s:<14} {row['docs_per_s_wall']:>11.1f} {row['docs_per_s_cpu']:>10.1f} {row['removed']:>8} "
              + " ".join(f"{c:>15}" for c in cells) + f" {fex:>3}/{nex}")
    print("(cells: planted pairs of that Jaccard band no longer both kept; recall for J >= 0.8, false removal for J < 0.6)")


def recall_over_seeds(corpus: Path, tmp: Path, plants: list[dict], systems: list[str], args: argparse.Namespace) -> dict:
    """Per system, removed pairs per Jaccard band summed over MinHash seeds 1..N: one seed's few
    chance misses (or chance collisions) are luck, N seeds compare the methods."""
    totals = {s: {h: [0, 0] for h in band_table(plants, set())} for s in systems}
    for seed in range(1, args.recall_seeds + 1):
        for s in systems:
            work = tmp / f"{s}_seed{seed}"
            _, ids, _ = run_system(s, corpus, work, args, seed)
            for h, (f, n) in band_table(plants, ids).items():
                totals[s][h][0] += f
                totals[s][h][1] += n
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nremoved pairs by Jaccard band, summed over seeds 1..{args.recall_seeds}:")
    for s, bands in totals.items():
        print(f"  {s:<14} " + "  ".join(f"{h}: {f}/{n} ({f / max(n, 1):.2%})" for h, (f, n) in bands.items()))
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000, help="real documents before planting")
    ap.add_argument("--near-frac", type=float, default=0.1)
    ap.add_argument("--exact-frac", type=float, default=0.02)
    ap.add_argument("--low-frac", type=float, default=0.0, help="plant this fraction of low-Jaccard (0.25-0.75) copies")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1, help="processes for every system")
    ap.add_argument("--repeats", type=int, default=2, help="best of N (alternating runs)")
    ap.add_argument("--systems", default="kiln,datatrove", help=f"comma list of {', '.join(SYSTEMS)}")
    ap.add_argument("--datatrove-tokenizer", choices=["whitespace", "spacy"], default="whitespace")
    ap.add_argument("--datatrove-hash", choices=["xxhash", "sha1"], default="xxhash",
                    help="datatrove's shingle hash (its default is xxhash, 64-bit)")
    ap.add_argument("--extra-site", default="", help="a directory appended to sys.path (e.g. where spaCy is)")
    ap.add_argument("--json", default="", help="write the results here too")
    ap.add_argument("--recall-seeds", type=int, default=0,
                    help="also sum removals per Jaccard band over MinHash seeds 1..N for every system")
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    if not systems or any(s not in SYSTEMS for s in systems):
        ap.error(f"--systems: expected a comma list of {', '.join(SYSTEMS)}, got {args.systems!r}")
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
        plants, n_total = build_corpus(tmp / "corpus", args.docs, args.near_frac, args.exact_frac, args.shards, seed=0,
                                       low_frac=args.low_frac)
        clocks: dict[str, list[Clock]] = {s: [] for s in systems}
        kept: dict[str, set[str]] = {}
        manifests: dict[str, dict] = {}
        for r in range(args.repeats):
            for system in (systems if r % 2 == 0 else systems[::-1]):  # interleaved: load hits all alike
                work = tmp / f"{system}_{r}"
                clock, kept[system], manifests[system] = run_system(system, tmp / "corpus", work, args)
                clocks[system].append(clock)
                print(f"  run {r} {system:<14} wall {clock.wall:7.2f}s  cpu {clock.cpu:7.2f}s", flush=True)
                shutil.rmtree(work, ignore_errors=True)
        out: dict = {"docs": n_total, "workers": args.workers, "datatrove_tokenizer": args.datatrove_tokenizer,
                     "datatrove_hash": args.datatrove_hash, "planted_pairs": len(plants)}
        print(f"\n{n_total} docs ({args.docs} real + {len(plants)} planted copies), {args.shards} shards, "
              f"workers={args.workers}, datatrove tokenizer={args.datatrove_tokenizer}, hash={args.datatrove_hash}")
        for s in systems:
            out[s] = summarise(s, clocks[s], n_total, plants, kept[s])
        print_summary(out, systems)
        for s in systems:
            if s.startswith("kiln"):
                counts = manifests[s].get("counts", {})
                out[s]["candidate_pairs"] = [counts.get("candidate_pairs"), counts.get("candidate_pairs_rejected")]
                out[s]["phase_seconds"] = manifests[s].get("dedup", {}).get("phase_seconds")
                print(f"{s}: candidate pairs {counts.get('candidate_pairs')}, rejected {counts.get('candidate_pairs_rejected')}; "
                      f"phases {out[s]['phase_seconds']}")
                if "datatrove" in systems:
                    out[s]["speedup_wall"] = round(out["datatrove"]["wall_s"] / out[s]["wall_s"], 2)
                    out[s]["speedup_cpu"] = round(out["datatrove"]["cpu_s"] / out[s]["cpu_s"], 2)
                    print(f"speedup {s} / datatrove: {out[s]['speedup_wall']:.2f}x wall, "
                          f"{out[s]['speedup_cpu']:.2f}x cpu (goal >= 3x)")
        if args.recall_seeds:
            out["removed_by_jaccard_over_seeds"] = recall_over_seeds(tmp / "corpus", tmp, plants, systems, args)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
