"""Dedup stage: planted exact and near duplicates on real documents from the offline kit."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHashLSH

from llm.config import load_config
from llm.data.minhash import (
    Signer,
    UnionFind,
    band_keys,
    collision_probability,
    jaccard,
    normalize,
)
from llm.stages.output import StageError, run_stage
from llm.stages.registry import execute
from llm.storage import Store
from tests._dedup_helpers import colliding_low_pair, perturb, sh
from s3_server import S3Bucket, moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

N_BASE = 160  # real documents per shard in the stage tests


# --------------------------------------------------------------------------- helpers


def real_table(shared_data: Path, shard: int, start: int, n: int) -> pa.Table:
    return pq.read_table(shared_data / "pretrain" / f"shard_{shard:05d}.parquet").slice(start, n)


def restyle(text: str) -> str:
    """Same normalised text: different case, punctuation and whitespace."""
    return "  " + text.upper().replace(" ", " \t ").replace(".", " ;") + "!!"


def similar_pairs(texts: list[str], threshold: float) -> dict[tuple[int, int], float]:
    """Every pair with true 5-gram Jaccard >= threshold, from shared-shingle counts (inverted index)."""
    sets = [set(sh(t)) for t in texts]
    index: dict[bytes, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            index[g].append(i)
    shared: Counter[tuple[int, int]] = Counter()
    for docs in index.values():
        if len(docs) > 1:
            shared.update(combinations(docs, 2))
    out = {}
    for (a, b), n in shared.items():
        j = n / (len(sets[a]) + len(sets[b]) - n)
        if j >= threshold:
            out[(a, b)] = j
    return out


def publish_docs(root: Path, tables: list[pa.Table], tag: str = "x") -> str:
    """A finished upstream ("filter") output holding ``data/shard_XXXXX.parquet`` files."""

    def body(out, _):
        for i, t in enumerate(tables):
            pq.write_table(t, out.path(f"data/shard_{i:05d}.parquet"), row_group_size=64)
        return {"counts": {"docs_out": sum(t.num_rows for t in tables)}}

    return run_stage(Store(str(root)), "filter", {"tag": tag}, {}, "test", body).uri


def run_dedup(root: Path, docs_uri: str, *overrides: str, force: bool = False):
    cfg = load_config("tiny", [f"run.artifact_root={root}", "dedup.workers=1", *overrides])
    return execute("dedup", cfg, {"docs": docs_uri}, progress=False, force=force)


def read_output(uri: str) -> pa.Table:
    files = sorted(Path(uri, "data").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


@pytest.fixture(scope="module")
def planted(tmp_path_factory, shared_data):
    """Two shards of real docs with planted exact and near duplicates, deduplicated once."""
    rng = random.Random(0)
    s0 = real_table(shared_data, 0, 0, N_BASE)
    s1 = real_table(shared_data, 1, 0, N_BASE)
    texts0, texts1 = s0.column("text").to_pylist(), s1.column("text").to_pylist()
    long0 = [i for i, t in enumerate(texts0) if len(t.split()) >= 300]
    picks = rng.sample(long0, 40)
    exact_src, near_src = picks[:12], picks[12:]
    plants: list[dict] = []
    new_rows = []
    for i in exact_src:
        new_rows.append({**s0.slice(i, 1).to_pylist()[0], "text": restyle(texts0[i]), "id": f"exact-{i}"})
        plants.append({"src": i, "kind": "exact"})
    for i in near_src:
        text = perturb(texts0[i], rng.uniform(0.003, 0.012), rng)
        new_rows.append({**s0.slice(i, 1).to_pylist()[0], "text": text, "id": f"near-{i}"})
        plants.append({"src": i, "kind": "near", "jaccard": jaccard(sh(texts0[i]), sh(text))})
    s1 = pa.concat_tables([s1, pa.Table.from_pylist(new_rows, schema=s1.schema)])
    root = tmp_path_factory.mktemp("planted")
    uri = publish_docs(root, [s0, s1])
    res = run_dedup(root, uri)
    all_texts = texts0 + s1.column("text").to_pylist()
    return {"root": root, "uri": uri, "res": res, "plants": plants, "s0": s0, "s1": s1, "texts": all_texts}


# --------------------------------------------------------------------------- building blocks


def test_normalisation_and_shingles():
    assert normalize("Hello,  World!\n\tfoo_bar — ÉTÉ 2024.") == "hello world foo bar été 2024".encode()
    assert normalize(restyle("The cat sat. On the mat")) == normalize("the cat sat on the mat")
    assert sh("a b c d e f") == [b"a b c d e", b"b c d e f"]
    assert sh("only three words") == [b"only three words"]
    assert sh(" ... ") == []


def test_signatures_are_datasketch_minhash_with_xxh32_and_seeded():
    import xxhash
    from datasketch import MinHash

    docs = [sh("the quick brown fox jumps over the lazy dog again and again"), sh("lorem ipsum dolor sit amet consectetur")]
    sigs = Signer(112, seed=1).sign(docs)
    assert sigs.shape == (2, 112) and sigs.dtype == np.uint32
    ref = MinHash(num_perm=112, seed=1, hashfunc=xxhash.xxh32_intdigest)
    ref.update_batch(docs[0])
    assert np.array_equal(sigs[0], ref.hashvalues)
    assert np.array_equal(Signer(112, seed=1).sign(docs), sigs)  # deterministic
    assert not np.array_equal(Signer(112, seed=2).sign(docs), sigs)  # the seed matters


def test_band_layout_is_14x8_and_matches_minhashlsh(shared_data):
    """Our on-disk band keys find exactly the candidates of MinHashLSH(num_perm=112, params=(14, 8))."""
    rng = random.Random(1)
    texts = real_table(shared_data, 2, 0, 40).column("text").to_pylist()
    texts += [perturb(t, rng.uniform(0.01, 0.15), rng) for t in texts[:20]]
    signer = Signer(112, seed=1)
    sigs = signer.sign([sh(t) for t in texts])
    keys = band_keys(sigs, 14, 8)
    assert keys.shape == (len(texts), 14)
    ours = {(a, b) for a, b in combinations(range(len(texts)), 2) if (keys[a] == keys[b]).any()}
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    mh = [signer.minhash(s) for s in sigs]
    for i, m in enumerate(mh):
        lsh.insert(i, m)
    theirs = {tuple(sorted((i, j))) for i, m in enumerate(mh) for j in lsh.query(m) if i != j}
    assert ours == theirs and len(ours) >= 5
    # Why the layout is set explicitly: datasketch's threshold-derived layout is a different one.
    derived = MinHashLSH(threshold=0.8, num_perm=112)
    assert (derived.b, derived.r) != (14, 8)
    assert collision_probability(0.85, 14, 8) > 0.98 > collision_probability(0.85, derived.b, derived.r)


def test_recall_at_jaccard_085(shared_data):
    """Near-duplicate pairs with true Jaccard >= 0.85 share a band almost always (theory >= 98.8%)."""
    rng = random.Random(2)
    texts = [t for t in real_table(shared_data, 3, 0, 400).column("text").to_pylist() if len(t.split()) >= 200][:150]
    signer = Signer(112, seed=1)
    found = total = 0
    for t in texts:
        u = perturb(t, rng.uniform(0.002, 0.02), rng)
        if jaccard(sh(t), sh(u)) < 0.85:
            continue
        k = band_keys(signer.sign([sh(t), sh(u)]), 14, 8)
        total += 1
        found += bool((k[0] == k[1]).any())
    assert total >= 60
    assert found / total >= 0.95


def test_union_find_roots_are_smallest_ids():
    uf = UnionFind()
    for a, b in [(9, 4), (4, 7), (20, 30), (7, 2)]:
        uf.union(a, b)
    assert uf.clusters() == {2: [2, 4, 7, 9], 20: [20, 30]}


# --------------------------------------------------------------------------- the stage


def test_stage_removes_planted_exact_and_near_duplicates(planted):
    counts = planted["res"].manifest["counts"]
    out = read_output(planted["res"].uri)
    ids = set(out.column("id").to_pylist())
    plants = planted["plants"]
    # every planted exact copy (restyled: case, punctuation, whitespace) is gone, and counted as exact
    assert not any(f"exact-{p['src']}" in ids for p in plants if p["kind"] == "exact")
    assert counts["exact_dups"] >= 12
    # recall on planted near-duplicates with Jaccard >= 0.85
    near = [p for p in plants if p["kind"] == "near" and p["jaccard"] >= 0.85]
    assert len(near) >= 20
    removed = [p for p in near if f"near-{p['src']}" not in ids]
    assert len(removed) / len(near) >= 0.9
    # the originals (shard 0, earlier) are what survive
    src_ids = planted["s0"].column("id").to_pylist()
    assert all(src_ids[p["src"]] in ids for p in plants)
    assert counts["docs_out"] == out.num_rows == counts["docs_in"] - counts["exact_dups"] - counts["near_dups"]
    assert counts["near_dups"] >= len(removed)


def test_stage_keeps_distinct_documents(planted):
    """Nothing is removed unless it is similar to a document that stays."""
    texts = planted["texts"]
    ids_in = planted["s0"].column("id").to_pylist() + planted["s1"].column("id").to_pylist()
    kept = set(read_output(planted["res"].uri).column("id").to_pylist())
    pairs = similar_pairs(texts, 0.5)
    has_similar = {i for p in pairs for i in p}
    lonely = [i for i in range(len(texts)) if i not in has_similar]
    assert len(lonely) > 200
    assert all(ids_in[i] in kept for i in lonely)
    # every removed document has a kept partner with true Jaccard >= 0.5
    for i, did in enumerate(ids_in):
        if did not in kept:
            partners = [b if a == i else a for (a, b) in pairs if i in (a, b)]
            assert any(ids_in[j] in kept for j in partners), f"{did} removed without a similar kept document"


def test_manifest_records_layout_clusters_and_samples(planted):
    m = planted["res"].manifest
    assert m["dedup"]["minhash"]["num_perm"] == 112
    assert (m["dedup"]["minhash"]["bands"], m["dedup"]["minhash"]["rows_per_band"]) == (14, 8)
    assert m["counts"]["clusters"] >= 12 + 20
    assert 0 < m["counts"]["removal_rate"] < 0.5
    sample = m["sample_clusters"]
    assert len(sample) == 5
    for c in sample:
        assert c["size"] >= 2 and c["members"][0]["kept"] and not any(x["kept"] for x in c["members"][1:])
        assert all(x["first_line"] for x in c["members"])
    # columns and row order are carried through untouched
    out = read_output(planted["res"].uri)
    assert out.schema.names == planted["s0"].schema.names
    s0_out = pq.read_table(Path(planted["res"].uri, "data", "shard_00000.parquet"))
    assert s0_out.column("id").to_pylist() == [i for i in planted["s0"].column("id").to_pylist()
                                              if i in set(s0_out.column("id").to_pylist())]
    assert not list(Path(planted["res"].uri).rglob("_scratch"))


def test_keep_rule_is_smallest_id_and_independent_of_workers(tmp_path, shared_data):
    """A copy in an earlier shard wins over its original; 1 and 2 workers give identical bytes."""
    base = real_table(shared_data, 2, 0, 60)
    texts = base.column("text").to_pylist()
    idx = next(i for i, t in enumerate(texts) if len(t.split()) > 300)
    copy = pa.Table.from_pylist([{**base.slice(idx, 1).to_pylist()[0], "text": perturb(texts[idx], 0.005, random.Random(3)),
                                  "id": "the-copy"}], schema=base.schema)
    first = pa.concat_tables([real_table(shared_data, 3, 0, 40), copy])
    uri = publish_docs(tmp_path / "a", [first, base])
    one = run_dedup(tmp_path / "a", uri, "dedup.band_partitions=3")
    kept = set(read_output(one.uri).column("id").to_pylist())
    assert "the-copy" in kept and base.column("id")[idx].as_py() not in kept
    uri2 = publish_docs(tmp_path / "b", [first, base])
    two = run_dedup(tmp_path / "b", uri2, "dedup.workers=2")
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        assert pq.read_table(Path(one.uri, "data", name)).equals(pq.read_table(Path(two.uri, "data", name)))
    assert one.manifest["counts"] == two.manifest["counts"]
    assert two.manifest["key"] == run_dedup(tmp_path / "b", uri2, "dedup.workers=1").manifest["key"]


def test_kiln_dedup_cli(tmp_path, shared_data, capsys):
    from llm.cli.main import main

    root = tmp_path / "art"
    t = real_table(shared_data, 0, 0, 30)
    uri = publish_docs(root, [pa.concat_tables([t, t.slice(0, 5)])])
    rc = main(["dedup", "--input", f"docs={uri}", "--output", str(root), "--preset", "tiny",
               "--set", "dedup.workers=1", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dedup" in text and "docs_in=35" in text and "exact_dups=5" in text
    assert main(["dedup", "--input", f"docs={uri}", "--output", str(root), "--set", "dedup.bands=3"]) == 2
    assert "dedup.bands" in capsys.readouterr().err


def test_stage_reads_and_writes_s3(s3_bucket: S3Bucket, shared_data):
    """Input shards and the published output live in a bucket (moto_server on loopback)."""
    root = f"{s3_bucket.uri}/artifacts"
    t = real_table(shared_data, 1, 0, 25)
    docs = pa.concat_tables([t, t.slice(3, 4)])

    def body(out, _):
        pq.write_table(docs, out.path("data/shard_00000.parquet"))
        return {}

    store = Store(root)
    uri = run_stage(store, "filter", {"s3": 1}, {}, "test", body).uri
    cfg = load_config("tiny", [f"run.artifact_root={root}", "dedup.workers=1"])
    res = execute("dedup", cfg, {"docs": uri}, progress=False)
    assert res.uri.startswith("s3://") and res.manifest["counts"]["exact_dups"] == 4
    local = store.cache_path(f"{res.uri}/data/shard_00000.parquet")
    assert pq.read_table(local).column("id").to_pylist() == t.column("id").to_pylist()


# --------------------------------------------------------------------------- bad input


def _bad(tmp_path: Path, table: pa.Table, tag: str) -> str:
    return publish_docs(tmp_path, [real_table_small(), table], tag)


def real_table_small() -> pa.Table:
    return pa.table({"text": ["a perfectly fine document with enough words"], "id": ["ok-0"]})


@pytest.mark.parametrize("case", ["no_text", "empty", "null", "not_utf8", "not_string"])
def test_bad_input_names_file_and_row(tmp_path, case):
    if case == "no_text":
        table, expect = pa.table({"body": ["x"], "id": ["1"]}), "data/shard_00001.parquet: no 'text' column"
    elif case == "empty":
        table, expect = pa.table({"text": pa.array([], pa.string()), "id": pa.array([], pa.string())}), "shard_00001.parquet: empty shard"
    elif case == "null":
        table, expect = pa.table({"text": ["ok", "fine", None], "id": ["1", "2", "3"]}), "shard_00001.parquet: row 2: field 'text' is null"
    elif case == "not_utf8":
        raw = pa.array([b"good text", b"bad \xff\xfe bytes"], pa.binary())
        text = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
        table, expect = pa.table({"text": text, "id": ["1", "2"]}), "shard_00001.parquet: row 1: field 'text' is not valid UTF-8"
    else:
        table, expect = pa.table({"text": [1, 2], "id": ["1", "2"]}), "column 'text' has type int64"
    uri = _bad(tmp_path, table, case)
    with pytest.raises(StageError, match=expect.replace(".", r"\.").replace("(", r"\(")):
        run_dedup(tmp_path, uri)
    assert not list((tmp_path / "dedup").glob("*/manifest.json"))


def test_missing_data_files(tmp_path):
    def body(out, _):
        out.path("notes.txt").write_text("no data here")
        return {}

    uri = run_stage(Store(str(tmp_path)), "filter", {"t": 1}, {}, "test", body).uri
    with pytest.raises(StageError, match="no parquet files"):
        run_dedup(tmp_path, uri)


# --------------------------------------------------------------------------- candidate verification


@pytest.fixture(scope="module")
def verify_corpus(tmp_path_factory, shared_data):
    """Real docs + one J~0.4 pair that collides in a band + 20 planted pairs with J >= 0.9."""
    base = real_table(shared_data, 2, 0, 200)
    texts = base.column("text").to_pylist()
    long = [t for t in texts if len(t.split()) >= 300]
    low_src, low_copy, low_j = colliding_low_pair(long[:30])
    rng = random.Random(5)
    rows = [{"text": t, "id": "low-src" if t == low_src else f"doc-{i}"} for i, t in enumerate(texts)]
    high = []
    for k, t in enumerate(long[30:50]):
        copy = perturb(t, rng.uniform(0.002, 0.008), rng)
        high.append(jaccard(sh(t), sh(copy)))
        rows.append({"text": copy, "id": f"high-{k}"})
    rows.append({"text": low_copy, "id": "low-copy"})
    root = tmp_path_factory.mktemp("verify")
    uri = publish_docs(root, [pa.Table.from_pylist(rows)])
    return {"root": root, "uri": uri, "low_j": low_j, "high_j": high}


def test_verification_rejects_a_colliding_low_jaccard_pair(verify_corpus):
    """The J~0.4 pair shares a band: plain LSH removes its copy, verification keeps both."""
    v = verify_corpus
    assert 0.3 <= v["low_j"] <= 0.5 and min(v["high_j"]) >= 0.9
    on = run_dedup(v["root"], v["uri"])
    kept_on = set(read_output(on.uri).column("id").to_pylist())
    assert {"low-src", "low-copy"} <= kept_on
    assert not any(f"high-{k}" in kept_on for k in range(20))  # J >= 0.9: all removed
    off = run_dedup(v["root"], v["uri"], "dedup.verify=false")
    kept_off = set(read_output(off.uri).column("id").to_pylist())
    assert "low-copy" not in kept_off and "low-src" in kept_off
    assert not any(f"high-{k}" in kept_off for k in range(20))


def test_manifest_counts_candidate_pairs_and_rejections(verify_corpus):
    v = verify_corpus
    on = run_dedup(v["root"], v["uri"]).manifest
    off = run_dedup(v["root"], v["uri"], "dedup.verify=false").manifest
    c_on, c_off = on["counts"], off["counts"]
    # the same candidates are seen (verification adds neighbour pairs only in buckets of 3+)
    assert c_on["candidate_pairs"] >= c_off["candidate_pairs"] >= 21
    assert c_on["candidate_pairs_rejected"] >= 1 and c_off["candidate_pairs_rejected"] == 0
    assert c_off["near_dups"] - c_on["near_dups"] >= 1
    assert c_on["band_collisions"] == c_off["band_collisions"]
    assert on["dedup"]["verification"]["on"] and on["dedup"]["verification"]["threshold"] == 0.8
    assert not off["dedup"]["verification"]["on"]


def test_verification_is_part_of_the_key(verify_corpus):
    """Turning verification off, or moving its threshold, is a different output (recomputed)."""
    v = verify_corpus
    on = run_dedup(v["root"], v["uri"])
    off = run_dedup(v["root"], v["uri"], "dedup.verify=false")
    strict = run_dedup(v["root"], v["uri"], "dedup.threshold=0.99")
    keys = {on.manifest["key"], off.manifest["key"], strict.manifest["key"]}
    assert len(keys) == 3 and len({on.uri, off.uri, strict.uri}) == 3
    # a stricter threshold rejects more of the same candidates, computed, not read from the cache
    assert strict.manifest["counts"]["candidate_pairs_rejected"] > on.manifest["counts"]["candidate_pairs_rejected"]
    assert run_dedup(v["root"], v["uri"]).manifest["key"] == on.manifest["key"]


def test_verification_pairs_neighbours_in_a_bucket():
    """A chance member that is the bucket's smallest id must not keep the true pair apart."""
    from llm.data.dedup import _same_key_pairs

    keys = np.array([7, 7, 7, 9, 9], dtype=np.uint64)
    ids = np.array([1, 2, 3, 4, 5], dtype=np.uint64)
    a, b, n = _same_key_pairs(keys, ids)
    assert sorted(zip(a.tolist(), b.tolist())) == [(1, 2), (1, 3), (4, 5)] and n == 3
    a, b, n = _same_key_pairs(keys, ids, chain=True)
    assert sorted(zip(a.tolist(), b.tolist())) == [(1, 2), (1, 3), (2, 3), (4, 5)] and n == 3
