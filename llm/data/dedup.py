"""The dedup stage: exact dedup on normalised text, then MinHash LSH near-dedup.

Input role ``docs``: a data stage output with ``data/*.parquet`` (a ``text`` column; every other
column is carried through untouched). Output: ``data/<same names>.parquet`` with the
duplicates removed, and a manifest with counts and a sample of clusters.

The work is shaped to scale out, in four phases, each a list of units on the ``run.executor``
(llm/data/executor.py: the local process pool or a Dask cluster). Every unit writes its own files
and a part manifest under the ``.partial`` work dir, so a rerun after a crash redoes only the units
that did not finish:

1. **Signatures** (parallel, one task per shard, ``cfg.dedup.workers`` processes). A worker
   streams its shard one row group at a time: normalise, exact key, word 5-gram shingles,
   datasketch MinHash (xxh32, 112 permutations, fixed seed), 14 band keys. It writes its
   signatures (``sig/<shard>.parquet``) and, per band, a bucket table
   (``bands/band_BB/part_PPP/<shard>.parquet``: bucket key, doc id). Its memory is one row
   group plus parquet writer buffers, whatever the shard or corpus size.
2. **Exact dedup** (one unit): documents with the same exact key are one group; all but the
   smallest id are exact duplicates (written as (keeper, duplicate) pairs). They are left out of
   the near-dup step (their signatures are identical to their keeper's, so this changes no
   cluster, only the work and the counts).
3. **Clusters**: one unit per band (and bucket-hash partition of it) reads the bucket table of
   every shard, sorts by bucket and writes its candidate pairs: every member with the bucket's
   smallest id and, when verifying, also with its previous member (so a chance smallest id that
   fails verification cannot cut a true group apart). A unit holds one (band, partition) table,
   ``16 bytes x docs / band_partitions``. This process then merges the distinct pairs of all
   units (a pair found in several bands counts once). With ``dedup.verify`` (the default) each
   is checked once, against the candidates' signatures streamed from ``sig/``: it joins a
   cluster (union-find) only when the fraction of equal MinHash values, an estimate of its
   shingle Jaccard, reaches ``dedup.threshold``, so one chance band collision no longer merges
   two documents with Jaccard 0.4. Verify off: every pair joins (the LSH rule). Memory here is
   the distinct pairs, their signatures and a union-find over the documents in some pair
   (duplicates, not the corpus).
4. **Filtering** (parallel, one task per shard): stream each shard by row group and drop the
   rows that are not their cluster's keeper.

Document id = ``(shard index << 32) | row`` with shards in file-name order. **Keep rule**: in
every cluster (exact or near) the document with the smallest (shard, row) id survives, so the
result does not depend on the number of workers or on timing.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm.config import KilnConfig
from llm.stages.output import StageError, StageOutput
from llm.storage import Store, atomic_path, join
from llm.data.docs import check_published_docs, column_strings, iter_row_groups, list_doc_files, open_checked, output_names
from llm.data.minhash import (
    SCHEME,
    Signer,
    UnionFind,
    band_keys,
    collision_probability,
    exact_key,
    lsh_threshold,
    normalize,
    shingles,
)
from llm.data.executor import Executor, Unit, run_units, stage_executor

NORMALISATION = (
    "lowercase (str.lower); every run of characters that are not Unicode letters or digits "
    "(punctuation, symbols, underscores, any whitespace) becomes one space; ends stripped"
)
KEEP_RULE = "in each cluster (exact or near) the document with the smallest (shard index, row) survives; shards in file-name order"
# Dot-prefixed: never published, and kept when the stage fails, so a rerun resumes from the units done.
SCRATCH = ".scratch"
UNITS = ".units"
FIRST_LINE_CHARS = 160
SAMPLE_MEMBERS = 5

SIG_SCHEMA_FIELDS = ("doc_id", "exact", "words", "sig")
BAND_SCHEMA = pa.schema([("bucket", pa.uint64()), ("doc_id", pa.uint64())])


def band_path(scratch: Path, band: int, part: int, shard: int) -> Path:
    """One shard's bucket table for one (band, partition)."""
    return scratch / "bands" / f"band_{band:02d}" / f"part_{part:03d}" / f"{shard:05d}.parquet"


def sign_outputs(task: "SignTask") -> tuple[str, ...]:
    """Every file a signature unit writes (checked when a rerun resumes)."""
    return (str(Path(task.scratch) / "sig" / f"{task.shard:05d}.parquet"),
            *(str(band_path(Path(task.scratch), b, p, task.shard)) for b in range(task.bands) for p in range(task.partitions)))


def doc_id(shard: int, row: int) -> int:
    return (shard << 32) | row


def split_id(did: int) -> tuple[int, int]:
    return did >> 32, did & 0xFFFFFFFF


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux's VmHWM, not ``ru_maxrss``: the latter carries the parent's peak across fork+exec,
    so a spawned worker would report its parent's memory instead of its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, bytes on macOS


# --------------------------------------------------------------------------- phase 1: signatures


@dataclass(frozen=True)
class SignTask:
    shard: int
    name: str  # e.g. data/shard_00000.parquet, for error messages
    path: str
    scratch: str
    ngram: int
    bands: int
    rows: int
    seed: int
    partitions: int


def sign_shard(task: SignTask) -> dict[str, Any]:
    """Phase 1 for one shard: stream row groups, write signatures and per-band bucket tables."""
    t0 = time.time()
    scratch = Path(task.scratch)
    pf = open_checked(Path(task.path), task.name, columns=("text",))
    signer = Signer(task.bands * task.rows, task.seed)
    stem = f"{task.shard:05d}.parquet"
    sig_path = scratch / "sig" / stem
    sig_path.parent.mkdir(parents=True, exist_ok=True)
    sig_schema = pa.schema([
        ("doc_id", pa.uint64()), ("exact", pa.uint64()), ("words", pa.uint32()),
        ("sig", pa.list_(pa.uint32(), task.bands * task.rows)),
    ])
    band_writers: dict[tuple[int, int], pq.ParquetWriter] = {}
    rows = 0
    no_words = 0
    # Every file through atomic_path: a worker killed mid-unit leaves only dot-prefixed temp files.
    with contextlib.ExitStack() as files:
        for b in range(task.bands):
            for p in range(task.partitions):
                tmp = files.enter_context(atomic_path(band_path(scratch, b, p, task.shard)))
                band_writers[(b, p)] = files.enter_context(pq.ParquetWriter(tmp, BAND_SCHEMA, compression="none"))
        sig_writer = files.enter_context(pq.ParquetWriter(files.enter_context(atomic_path(sig_path)), sig_schema,
                                                          compression="none"))
        for first_row, batch in iter_row_groups(pf, columns=["text"]):  # one row group in memory at a time
            texts = column_strings(batch.column("text"), task.name, "text", first_row)
            norms = [normalize(t) for t in texts]
            shingle_lists = [shingles(n, task.ngram) for n in norms]
            sigs = signer.sign(shingle_lists)
            ids = np.arange(rows, rows + len(texts), dtype=np.uint64) | np.uint64(task.shard << 32)
            words = np.array([n.count(b" ") + 1 if n else 0 for n in norms], dtype=np.uint32)
            exact = np.array([exact_key(n) for n in norms], dtype=np.uint64)
            sig_writer.write_batch(pa.record_batch([
                pa.array(ids), pa.array(exact), pa.array(words),
                pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1)), task.bands * task.rows),
            ], schema=sig_schema))
            has_words = words > 0  # empty texts have no shingles: only exact dedup applies
            no_words += int((~has_words).sum())
            keys = band_keys(sigs[has_words], task.bands, task.rows)
            kept_ids = ids[has_words]
            part = (keys % np.uint64(task.partitions)).astype(np.int64) if task.partitions > 1 else None
            for b in range(task.bands):
                for p in range(task.partitions):
                    sel = slice(None) if part is None else part[:, b] == p
                    band_writers[(b, p)].write_batch(
                        pa.record_batch([pa.array(keys[sel, b]), pa.array(kept_ids[sel])], schema=BAND_SCHEMA))
            rows += len(texts)
    if rows == 0:
        raise StageError(f"{task.name}: empty shard (0 rows)")
    return {"shard": task.shard, "rows": rows, "no_words": no_words, "seconds": time.time() - t0,
            "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- phase 2 + 3: clusters


def _read_columns(paths: Sequence[Path], columns: list[str]) -> dict[str, np.ndarray]:
    tables = [pq.read_table(p, columns=columns) for p in paths]
    out = {}
    for c in columns:
        arrays = [t.column(c).to_numpy() for t in tables if t.num_rows]
        out[c] = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint64)
    return out


def _same_key_pairs(keys: np.ndarray, ids: np.ndarray, chain: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """For every group of equal keys: (group's smallest id, other member) pairs, and their count.

    With ``chain``, the pairs also hold (previous member, member) in id order. Without
    verification the star alone connects a group; with it, a chance member that fails against
    the smallest id must not cut the others apart, so each is also compared with its neighbour
    (at most two pairs per member, so a large bucket stays linear).
    """
    if len(keys) < 2:
        return np.empty(0, np.uint64), np.empty(0, np.uint64), 0
    order = np.lexsort((ids, keys))
    k, d = keys[order], ids[order]
    same = np.empty(len(k), dtype=bool)
    same[0] = False
    same[1:] = k[1:] == k[:-1]
    starts = np.where(same, 0, np.arange(len(k)))
    first = np.maximum.accumulate(starts)  # index of each row's group start
    idx = np.flatnonzero(same)
    if not chain:
        return d[first[idx]], d[idx], len(idx)
    prev = idx - 1
    extra = first[idx] != prev  # the neighbour pair differs from the star pair
    return (np.concatenate([d[first[idx]], d[prev[extra]]]), np.concatenate([d[idx], d[idx[extra]]]), len(idx))


PAIR_SCHEMA = pa.schema([("keeper", pa.uint64()), ("member", pa.uint64())])


@dataclass(frozen=True)
class PairTask:
    """A unit that writes (keeper, member) pairs: the exact phase (``band_dir`` empty) or one bucket table."""

    scratch: str
    dest: str
    band_dir: str = ""
    chain: bool = False  # also (previous member, member) pairs: verification needs them (see _same_key_pairs)


def _write_pairs(dest: str, keepers: np.ndarray, members: np.ndarray) -> None:
    with atomic_path(dest) as tmp:
        pq.write_table(pa.table([pa.array(keepers, pa.uint64()), pa.array(members, pa.uint64())], schema=PAIR_SCHEMA),
                       tmp, compression="none")


def read_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(path)
    return t.column("keeper").to_numpy(), t.column("member").to_numpy()


def exact_unit(task: PairTask) -> dict[str, Any]:
    """Phase 2 as one unit: every exact duplicate paired with its group's keeper."""
    scratch = Path(task.scratch)
    cols = _read_columns(sorted((scratch / "sig").glob("*.parquet")), ["doc_id", "exact"])
    keepers, dups, _ = _same_key_pairs(cols["exact"], cols["doc_id"])
    _write_pairs(task.dest, keepers, dups)
    return {"pairs": len(dups)}


def band_unit(task: PairTask) -> dict[str, Any]:
    """Phase 3 for one (band, partition) bucket table: its candidate pairs, exact duplicates left out."""
    exact_dest = Path(task.scratch) / "pairs" / "exact.parquet"
    skip = np.unique(read_pairs(exact_dest)[1]) if exact_dest.exists() else np.empty(0, np.uint64)
    band_dir = Path(task.band_dir)
    keepers, others, collisions = band_pairs(band_dir, skip, task.chain)
    _write_pairs(task.dest, keepers, others)
    return {"collisions": collisions,
            "table_rows": sum(pq.ParquetFile(p).metadata.num_rows for p in band_dir.glob("*.parquet"))}


def band_pairs(band_dir: Path, skip: np.ndarray, chain: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate pairs of one (band, partition) table, leaving out the ids in sorted ``skip``, and
    the band's collisions (members that share a bucket with a smaller id)."""
    cols = _read_columns(sorted(band_dir.glob("*.parquet")), ["bucket", "doc_id"])
    buckets, ids = cols["bucket"], cols["doc_id"]
    if len(skip) and len(ids):
        pos = np.searchsorted(skip, ids)
        pos[pos == len(skip)] = 0
        keep = skip[pos] != ids
        buckets, ids = buckets[keep], ids[keep]
    return _same_key_pairs(buckets, ids, chain)


def unique_pairs(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (smaller id, larger id) pairs, sorted: a pair found in several bands is verified once."""
    if not parts:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    a = np.concatenate([p[0] for p in parts]).astype(np.uint64)
    b = np.concatenate([p[1] for p in parts]).astype(np.uint64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if not len(lo):
        return lo, hi
    order = np.lexsort((hi, lo))
    lo, hi = lo[order], hi[order]
    new = np.ones(len(lo), dtype=bool)
    new[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[new], hi[new]


def candidate_signatures(sig_paths: Sequence[Path], wanted: np.ndarray) -> np.ndarray:
    """(len(wanted), num_perm) signatures of the sorted ids ``wanted``, streamed one batch at a
    time, so memory holds the candidates' signatures only, not the corpus's."""
    out: np.ndarray | None = None
    for path in sig_paths:
        pf = pq.ParquetFile(path)
        width = pf.schema_arrow.field("sig").type.list_size
        if out is None:
            out = np.zeros((len(wanted), width), dtype=np.uint32)
        for batch in pf.iter_batches(batch_size=8192, columns=["doc_id", "sig"]):
            ids = batch.column(0).to_numpy()
            pos = np.searchsorted(wanted, ids)
            pos[pos == len(wanted)] = 0
            hit = wanted[pos] == ids if len(wanted) else np.zeros(len(ids), dtype=bool)
            if hit.any():
                sigs = batch.column(1).flatten().to_numpy().reshape(-1, width)
                out[pos[hit]] = sigs[hit]
    return out if out is not None else np.zeros((0, 0), dtype=np.uint32)


def estimated_jaccard(a: np.ndarray, b: np.ndarray, sig_paths: Sequence[Path], chunk: int = 1 << 16) -> np.ndarray:
    """Per pair, the fraction of equal MinHash values: an unbiased estimate of the shingle Jaccard
    (binomial, std sqrt(J(1-J)/num_perm): 0.028 at J=0.9 with 112 permutations)."""
    wanted = np.unique(np.concatenate([a, b]))
    sigs = candidate_signatures(sig_paths, wanted)
    pa_, pb_ = np.searchsorted(wanted, a), np.searchsorted(wanted, b)
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), chunk):  # bounded temporary: chunk x num_perm booleans
        out[s:s + chunk] = (sigs[pa_[s:s + chunk]] == sigs[pb_[s:s + chunk]]).mean(axis=1)
    return out


# --------------------------------------------------------------------------- phase 4: filter


@dataclass(frozen=True)
class FilterTask:
    shard: int
    name: str
    path: str
    dest: str
    remove_rows: np.ndarray  # sorted row indices to drop
    sample_rows: tuple[int, ...]  # rows whose first line goes into the manifest's cluster sample
    row_group_rows: int


def _first_line(text: str) -> str:
    line = text.strip().split("\n", 1)[0].strip()
    return line[:FIRST_LINE_CHARS] + ("…" if len(line) > FIRST_LINE_CHARS else "")


def filter_shard(task: FilterTask) -> dict[str, Any]:
    """Phase 4 for one shard: stream row groups, keep the survivors, write a temp file and rename."""
    t0 = time.time()
    pf = open_checked(Path(task.path), task.name, columns=("text",))
    samples: dict[int, str] = {}
    want = set(task.sample_rows)
    writer: pq.ParquetWriter | None = None
    buffer: list[pa.Table] = []
    buffered = kept = row = 0

    def flush() -> None:
        nonlocal writer, buffer, buffered
        if not buffered:
            return
        if writer is None:
            writer = pq.ParquetWriter(tmp, pf.schema_arrow, compression="zstd")
        writer.write_table(pa.concat_tables(buffer), row_group_size=task.row_group_rows)
        buffer, buffered = [], 0

    # The writer opens on the first kept row: a shard that keeps none leaves no file, so none is published.
    with atomic_path(task.dest) as tmp:
        try:
            for _, batch in iter_row_groups(pf):
                n = batch.num_rows
                if want:
                    hit = [r for r in range(row, row + n) if r in want]
                    if hit:
                        texts = batch.column("text")
                        for r in hit:
                            samples[r] = _first_line(texts[r - row].as_py())
                lo, hi = np.searchsorted(task.remove_rows, [row, row + n])
                if hi > lo:
                    mask = np.ones(n, dtype=bool)
                    mask[task.remove_rows[lo:hi] - row] = False
                    batch = batch.filter(pa.array(mask))
                if batch.num_rows:
                    buffer.append(batch)
                    buffered += batch.num_rows
                    kept += batch.num_rows
                if buffered >= task.row_group_rows:
                    flush()
                row += n
            flush()
        finally:
            if writer is not None:
                writer.close()
    return {"shard": task.shard, "rows": row, "kept": kept, "samples": samples,
            "seconds": time.time() - t0, "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- orchestration


def _input_files(cfg: KilnConfig, inputs: dict[str, dict]) -> list[tuple[str, Path]]:
    """(name, local path) of every input shard, checked; the name is also the shard's output name."""
    if "docs" not in inputs:
        raise StageError(f"dedup needs an input named 'docs' (got {sorted(inputs)})")
    store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    docs_uri = inputs["docs"]["uri"]
    listed = list_doc_files(store, docs_uri)
    names = output_names("dedup", [(join(docs_uri, name), name) for name, _ in listed])
    files = [(name, path) for name, (_, path) in zip(names, listed)]
    if len(files) >= 1 << 31:
        raise StageError(f"dedup: {len(files)} input shards; at most 2^31 are supported")
    for name, path in files:
        pf = open_checked(path, name, columns=("text",), nonempty=True)
        if pf.metadata.num_rows >= 1 << 32:
            raise StageError(f"{name}: {pf.metadata.num_rows} rows; at most 2^32 per shard are supported")
    return files


def run(cfg: KilnConfig, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    d = cfg.dedup
    files = _input_files(cfg, inputs)
    scratch = out.workdir / SCRATCH  # kept if the stage fails: a rerun resumes from the finished units
    scratch.mkdir(parents=True, exist_ok=True)
    # 1. signatures + per-band bucket tables, per shard in parallel
    sign_tasks = [SignTask(i, name, str(path), str(scratch), d.ngram, d.num_bands, d.rows_per_band, d.seed,
                           d.band_partitions) for i, (name, path) in enumerate(files)]
    with stage_executor(cfg.run.executor, d.workers) as executor:
        result = _run_phases(cfg, out, files, scratch, sign_tasks, executor, progress)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def _filter_result(r: dict[str, Any]) -> dict[str, Any]:
    """A filter unit's result read back from its JSON part manifest (sample rows are int keys)."""
    return {**r, "samples": {int(k): v for k, v in r["samples"].items()}}


def _run_phases(cfg: KilnConfig, out: StageOutput, files: list[tuple[str, Path]], scratch: Path,
                sign_tasks: list[SignTask], executor: Executor, progress: bool) -> dict[str, Any]:
    """Signatures, exact groups, band clustering, then filtering each shard: the phases in order."""
    d = cfg.dedup
    parts = out.workdir / UNITS
    timings: dict[str, float] = {}
    t = time.time()
    signed = run_units(executor, sign_shard, [Unit(f"shard_{s.shard:05d}", s, sign_outputs(s)) for s in sign_tasks],
                       parts / "dedup-signatures", desc="dedup signatures", progress=progress)
    timings["signatures"] = time.time() - t
    docs_in = sum(r["rows"] for r in signed)

    # 2. exact duplicates
    t = time.time()
    uf = UnionFind()
    exact_removed = _exact_phase(executor, scratch, parts, uf, progress) if d.exact else np.empty(0, np.uint64)
    exact_group_count = len(uf.clusters())
    timings["exact"] = time.time() - t

    # 3. near duplicates: one (band, partition) bucket table per unit
    t = time.time()
    collisions, peak_table_rows, verified = _cluster_bands(d, scratch, executor, parts, uf, progress)
    clusters = uf.clusters()
    timings["clusters"] = time.time() - t
    exact_set = set(exact_removed.tolist())
    removed, near = _removals(clusters, exact_set)
    ranked = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))[: d.sample_clusters]

    # 4. filter each shard
    t = time.time()
    sample_rows = _sample_rows(ranked)
    filter_units = [Unit(f"shard_{i:05d}", FilterTask(i, name, str(path), str(out.path(name)),
                                                        np.array(sorted(removed.get(i, [])), dtype=np.int64),
                                                        tuple(sorted(sample_rows.get(i, ()))), d.row_group_rows),
                         (str(out.path(name)),)) for i, (name, path) in enumerate(files)]
    filtered = run_units(executor, filter_shard, filter_units, parts / "dedup-filter", desc="dedup filter",
                         progress=progress, decode=_filter_result)
    timings["filter"] = time.time() - t

    docs_out = sum(r["kept"] for r in filtered)
    exact_dups = len(exact_removed)
    assert docs_out == docs_in - exact_dups - near, "dedup bookkeeping mismatch"
    check_published_docs("dedup", out.workdir, [files[r["shard"]][0] for r in filtered if r["kept"]], docs_out)
    method = _method(d)
    method["docs_without_words"] = sum(r["no_words"] for r in signed)
    method["memory"] = {
        "signature_worker_peak_rss_mb": round(max(r["peak_rss_mb"] for r in signed), 1),
        "filter_worker_peak_rss_mb": round(max(r["peak_rss_mb"] for r in filtered), 1),
        "largest_band_table_rows": peak_table_rows,
        "union_find_ids": len(uf.parent),
        "note": "workers stream row groups (flat in corpus size); a band unit holds one (band, partition) "
                "bucket table; the parent holds the distinct candidate pairs, their signatures when verifying, "
                "and a union-find over candidate duplicates",
    }
    method["phase_seconds"] = {k: round(v, 3) for k, v in timings.items()}
    return {
        "counts": {
            "docs_in": docs_in,
            "docs_out": docs_out,
            "exact_dups": exact_dups,
            "near_dups": near,
            "clusters": len(clusters),
            "exact_groups": exact_group_count,
            "removal_rate": round((docs_in - docs_out) / docs_in, 6),
            "band_collisions": collisions,
            "candidate_pairs": verified["pairs"],
            "candidate_pairs_rejected": verified["rejected"],
            "shards_in": len(files),
            "shards_out": sum(1 for r in filtered if r["kept"]),
        },
        "dedup": method,
        "sample_clusters": _cluster_sample(ranked, files, exact_set, filtered),
        "shards": [{"name": files[r["shard"]][0], "docs_in": r["rows"], "docs_out": r["kept"]} for r in filtered],
    }


def _exact_phase(executor: Executor, scratch: Path, parts: Path, uf: UnionFind, progress: bool) -> np.ndarray:
    """Union exact duplicates with their keeper (one unit); return the sorted ids of the removed ones."""
    dest = scratch / "pairs" / "exact.parquet"
    run_units(executor, exact_unit, [Unit("exact", PairTask(str(scratch), str(dest)), (str(dest),))],
              parts / "dedup-exact", desc="dedup exact", progress=progress)
    keepers, dups = read_pairs(dest)
    for a, b in zip(keepers.tolist(), dups.tolist()):
        uf.union(a, b)
    return np.unique(dups)


def _band_units(d: Any, scratch: Path) -> list[Unit]:
    """One unit per (band, partition) bucket table, each writing its own pairs file."""
    units = []
    for b in range(d.num_bands):
        for p in range(d.band_partitions):
            name = f"band_{b:02d}_part_{p:03d}"
            dest = scratch / "pairs" / f"{name}.parquet"
            band_dir = scratch / "bands" / f"band_{b:02d}" / f"part_{p:03d}"
            units.append(Unit(name, PairTask(str(scratch), str(dest), str(band_dir), chain=d.verify), (str(dest),)))
    return units


def _distinct_pairs(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs of every band unit, merged one file at a time (memory: the distinct
    pairs plus one file's, not every band's copy of a pair)."""
    acc = (np.empty(0, np.uint64), np.empty(0, np.uint64))
    for path in paths:
        acc = unique_pairs([acc, read_pairs(path)])
    return acc


def _cluster_bands(d: Any, scratch: Path, executor: Executor, parts: Path, uf: UnionFind,
                   progress: bool) -> tuple[int, int, dict[str, int]]:
    """Candidate pairs per (band, partition) bucket table as units; here, their distinct pairs,
    verified against the signatures when ``dedup.verify``, and the union of the survivors.

    Returns (band collisions, rows of the largest table, {"pairs", "rejected"})."""
    units = _band_units(d, scratch)
    done = run_units(executor, band_unit, units, parts / "dedup-clusters", desc="dedup bands", progress=progress)
    a, b = _distinct_pairs([u.arg.dest for u in units])
    stats = {"pairs": int(len(a)), "rejected": 0}
    if d.verify and len(a):
        ok = estimated_jaccard(a, b, sorted((scratch / "sig").glob("*.parquet"))) >= d.threshold
        stats["rejected"] = int(len(a) - ok.sum())
        a, b = a[ok], b[ok]
    for x, y in zip(a.tolist(), b.tolist()):
        uf.union(x, y)
    return sum(r["collisions"] for r in done), max((r["table_rows"] for r in done), default=0), stats


def _removals(clusters: dict[int, list[int]], exact_set: set[int]) -> tuple[dict[int, list[int]], int]:
    """Which rows go, per shard (all but each cluster's smallest id), and how many were near (not exact) dups."""
    removed: dict[int, list[int]] = {}
    near = 0
    for members in clusters.values():
        for m in members[1:]:  # the keep rule: members are sorted, the smallest id stays
            s, r = split_id(m)
            removed.setdefault(s, []).append(r)
            near += m not in exact_set
    return removed, near


def _sample_rows(ranked: list[tuple[int, list[int]]]) -> dict[int, set[int]]:
    """Per shard, the rows of the largest clusters whose first line the manifest shows."""
    sample_rows: dict[int, set[int]] = {}
    for _, members in ranked:
        for m in members[:SAMPLE_MEMBERS]:
            s, r = split_id(m)
            sample_rows.setdefault(s, set()).add(r)
    return sample_rows


def _cluster_sample(ranked: list[tuple[int, list[int]]], files: list[tuple[str, Path]], exact_set: set[int],
                    filtered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The largest clusters as a person reads them: which member stayed, which went and why, first lines."""
    first_lines = {doc_id(r["shard"], row): line for r in filtered for row, line in r["samples"].items()}
    sample = []
    for _, members in ranked:
        shown, keeper = members[:SAMPLE_MEMBERS], members[0]
        sample.append({
            "size": len(members),
            "members": [{"shard": files[split_id(m)[0]][0], "row": split_id(m)[1], "kept": m == keeper,
                         "kind": "keep" if m == keeper else ("exact" if m in exact_set else "near"),
                         "first_line": first_lines.get(m, "")} for m in shown],
        })
    return sample


def _method(d: Any) -> dict[str, Any]:
    """How duplicates were found, stated in the manifest (the hash scheme explicitly: datasketch 2.x changed it)."""
    return {
        "normalisation": NORMALISATION,
        "exact_key": "xxh3_64 of the normalised UTF-8 text" if d.exact else "off",
        "shingles": f"word {d.ngram}-grams of the normalised text (a text with fewer words is one shingle)",
        "minhash": {
            "library": "datasketch MinHash.generator", "scheme": SCHEME, "hashfunc": "xxhash.xxh32_intdigest",
            "num_perm": d.num_perm, "bands": d.num_bands, "rows_per_band": d.rows_per_band, "seed": d.seed,
            "band_key": "xxh3_64 of the band's little-endian uint32 values",
            "threshold_approx": round(lsh_threshold(d.num_bands, d.rows_per_band), 4),
            "p_candidate_at_jaccard": {str(j): round(collision_probability(j, d.num_bands, d.rows_per_band), 4)
                                       for j in (0.5, 0.7, 0.8, 0.85, 0.9)},
        },
        "verification": _verification(d),
        "keep_rule": KEEP_RULE,
    }


def _verification(d: Any) -> dict[str, Any]:
    """How candidate pairs were checked before they joined a cluster (stated, as the key hashes it)."""
    if not d.verify:
        return {"on": False, "rule": "every LSH candidate pair (shared band bucket) joins a cluster"}
    return {
        "on": True, "threshold": d.threshold,
        "estimate": f"fraction of the {d.num_perm} MinHash values that are equal (signature-estimated Jaccard)",
        "pairs": "each bucket member with the bucket's smallest id and with its previous member; each distinct pair once",
        "rule": f"a candidate pair joins a cluster only when its estimate >= {d.threshold}",
        "exact_shingle_jaccard": "not computed (the estimate is used for every pair)",
    }


