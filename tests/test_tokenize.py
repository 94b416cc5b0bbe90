"""The tokenize stage and token shards: BOS-prefixed documents, exact counts, a stable split, memmap reads."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tiktoken

from llm.config import load_config
from llm.data.shards import ShardError, ShardWriter, doc_bucket, open_split, read_meta, token_dtype
from llm.data.tokenize import tokenize_docs
from llm.stages.output import StageError
from llm.stages.registry import execute
from llm.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from s3_server import S3Bucket, moto_server, s3_bucket  # noqa: F401  (pytest fixtures)
from tests._tok_helpers import publish_docs, real_docs

VAL = 0.2
SHARD_TOKENS = 30_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """Real documents in 3 files (small row groups), plus an empty one; a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("artifacts")
    docs = real_docs(shared_data, 180, shard=1)
    for d in docs:
        d["text"] = d["text"][:3000]  # keep the test fast; long docs are covered by the shard-writer test
    docs[7]["text"] = ""
    docs[8]["text"] = "emoji 🚀👍🏽 and 中文 survive"
    files = [docs[:70], docs[70:130], docs[130:]]
    docs_uri = publish_docs(root, files, row_group_size=16)
    cfg = load_config("tiny", {"run.artifact_root": str(root), "tokenizer.vocab_size": 600,
                               "tokenizer.max_train_chars": 400_000, "tokenize.val_fraction": VAL,
                               "tokenize.shard_tokens": SHARD_TOKENS, "tokenize.workers": 1})
    tok_res = execute("tokenizer", cfg, {"docs": docs_uri}, progress=False)
    res = execute("tokenize", cfg, {"docs": docs_uri, "tokenizer": tok_res.uri}, progress=False)
    return {"root": root, "docs": docs, "files": files, "docs_uri": docs_uri, "tok_uri": tok_res.uri, "cfg": cfg, "res": res}


def _split_docs(shards) -> list[list[int]]:
    return [s.doc(i).tolist() for s in shards for i in range(s.num_docs)]


def test_every_document_starts_with_bos_and_decodes(corpus) -> None:
    tok = load_tokenizer(corpus["tok_uri"])
    for split in ("train", "val"):
        shards = open_split(corpus["res"].uri, split)
        assert shards, split
        for s in shards:
            assert isinstance(s.tokens, np.memmap)
            assert s.tokens[0] == tok.bos_id
            assert np.all(s.tokens[s.doc_starts] == tok.bos_id)
            # BOS appears exactly at document starts: text never encodes to it.
            assert np.count_nonzero(np.asarray(s.tokens) == tok.bos_id) == s.num_docs
    texts = {d["text"] for d in corpus["docs"]}
    decoded = {tok.decode(doc[1:]) for split in ("train", "val") for doc in _split_docs(open_split(corpus["res"].uri, split))}
    assert decoded == texts - {""}


def test_counts_are_exact_and_content_in_order(corpus) -> None:
    tok = load_tokenizer(corpus["tok_uri"])
    expected: dict[str, list[list[int]]] = {"train": [], "val": []}
    nbytes = {"train": 0, "val": 0}
    for d in corpus["docs"]:  # input order: file by file, row by row
        if not d["text"]:
            continue
        split = "val" if doc_bucket(d["id"]) < VAL else "train"
        expected[split].append([tok.bos_id] + tok.encode(d["text"]))
        nbytes[split] += len(d["text"].encode("utf-8"))
    meta = read_meta(corpus["res"].uri)
    counts = corpus["res"].manifest["counts"]
    for split in ("train", "val"):
        assert _split_docs(open_split(corpus["res"].uri, split)) == expected[split]
        n_tokens = sum(len(x) for x in expected[split])
        assert meta["splits"][split]["tokens"] == counts[f"{split}_tokens"] == n_tokens
        assert meta["splits"][split]["docs"] == counts[f"{split}_docs"] == len(expected[split])
        assert meta["splits"][split]["bytes"] == nbytes[split]
    assert counts["empty_docs_skipped"] == 1
    assert counts["tokens"] == counts["train_tokens"] + counts["val_tokens"]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 600 and meta["bos_id"] == tok.bos_id


def test_shards_roll_over_at_document_boundaries(corpus) -> None:
    meta = read_meta(corpus["res"].uri)
    train = open_split(corpus["res"].uri, "train")
    assert len(train) == len(meta["splits"]["train"]["shards"]) >= 2
    for s in train:
        assert len(s) <= SHARD_TOKENS or s.num_docs == 1
    assert sum(len(s) for s in train) == meta["splits"]["train"]["tokens"]


def test_split_is_a_function_of_the_id(corpus, tmp_path: Path) -> None:
    """Regrouping the same documents into other files (and other row groups) keeps every split's documents."""
    docs = corpus["docs"]
    regrouped = publish_docs(tmp_path, [docs[100:], docs[:100]], row_group_size=50, tag="regrouped")
    out = tmp_path / "out"
    tokenize_docs(regrouped, corpus["tok_uri"], str(out), val_fraction=VAL, shard_tokens=SHARD_TOKENS)
    for split in ("train", "val"):
        a = sorted(map(tuple, _split_docs(open_split(corpus["res"].uri, split))))
        b = sorted(map(tuple, _split_docs(open_split(str(out), split))))
        assert a == b
    n_val = read_meta(str(out))["splits"]["val"]["docs"]
    assert 0.05 * len(docs) < n_val < 0.4 * len(docs)  # about VAL of the documents


def test_multi_worker_output_identical(corpus, tmp_path: Path) -> None:
    out = tmp_path / "w2"
    tokenize_docs(corpus["docs_uri"], corpus["tok_uri"], str(out), val_fraction=VAL, shard_tokens=SHARD_TOKENS,
                  workers=2, batch_docs=5)
    single = Path(corpus["res"].uri)
    files = sorted(p.relative_to(single).as_posix() for p in single.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    assert files == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) > 4
    for rel in files:
        assert filecmp.cmp(single / rel, out / rel, shallow=False), rel


def test_workers_do_not_change_the_cache_key(corpus) -> None:
    cfg = corpus["cfg"].model_copy(deep=True)
    cfg.tokenize.workers = 2
    cfg.tokenize.batch_docs = 7
    r = execute("tokenize", cfg, {"docs": corpus["docs_uri"], "tokenizer": corpus["tok_uri"]}, progress=False)
    assert r.cached and r.uri == corpus["res"].uri


def test_dtype_choice() -> None:
    assert token_dtype(256) == np.uint16
    assert token_dtype(65_536) == np.uint16  # ids 0..65535
    assert token_dtype(65_537) == np.uint32


def test_large_vocab_writes_uint32(corpus, tmp_path: Path) -> None:
    small = load_tokenizer(corpus["tok_uri"])
    ranks = small.mergeable_ranks()
    big = Tokenizer(tiktoken.Encoding("big", pat_str=small.encoding._pat_str, mergeable_ranks=ranks,
                                      special_tokens={s: 70_000 + i for i, s in enumerate(SPECIAL_TOKENS)}))
    big.save(tmp_path / "tok")
    out = tmp_path / "out"
    meta = tokenize_docs(corpus["docs_uri"], str(tmp_path / "tok"), str(out), val_fraction=VAL, shard_tokens=10**9)
    assert meta["dtype"] == "uint32" and meta["bos_id"] == 70_000
    shards = open_split(str(out), "train")
    assert shards[0].tokens.dtype == np.uint32 and shards[0].tokens[0] == 70_000
    # Same ids as the uint16 run apart from BOS.
    a = [d[1:] for d in _split_docs(shards)]
    b = [d[1:] for d in _split_docs(open_split(corpus["res"].uri, "train"))]
    assert a == b


def test_shard_writer_rollover(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=8)
    lens = np.array([5, 3, 10, 2, 4])
    toks = np.concatenate([np.r_[999, np.arange(n - 1)] for n in lens]).astype(np.uint16)
    w.add(toks[:18], lens[:3])
    w.add(toks[18:], lens[3:])
    info = w.close()
    assert info == {"tokens": 24, "docs": 5, "shards": [f"train/shard_{i:05d}.bin" for i in range(3)]}
    idx = [np.load(tmp_path / f"train/shard_{i:05d}.idx.npy").tolist() for i in range(3)]
    assert idx == [[0, 5], [0], [0, 2]]
    sizes = [(tmp_path / s).stat().st_size // 2 for s in info["shards"]]
    assert sizes == [8, 10, 6]


def test_reader_rejects_damaged_shards(corpus, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(corpus["res"].uri, out)
    meta = read_meta(str(out))
    first = out / meta["splits"]["train"]["shards"][0]
    with open(first, "ab") as f:
        f.write(b"\x01")  # odd byte count
    with pytest.raises(ShardError, match="shard_00000.bin"):
        open_split(str(out), "train")
    (out / "meta.json").write_text("{broken")
    with pytest.raises(ShardError, match="meta.json"):
        open_split(str(out), "train")
    with pytest.raises(ShardError, match="not found"):
        open_split(str(tmp_path / "nothing"), "train")


def test_reader_checks_bos_at_doc_starts(corpus, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(corpus["res"].uri, out)
    meta = read_meta(str(out))
    idx_path = out / meta["splits"]["val"]["shards"][0].replace(".bin", ".idx.npy")
    starts = np.load(idx_path)
    starts[1] += 1  # now points inside a document
    np.save(idx_path, starts)
    with pytest.raises(ShardError, match="does not start with BOS"):
        open_split(str(out), "val")


def test_missing_text_column_names_the_file(corpus, tmp_path: Path) -> None:
    bad = publish_docs(tmp_path, [[{"body": "x", "id": "1"}]], tag="notext")
    with pytest.raises(StageError, match=r"data/part_00000.parquet: no 'text' column"):
        tokenize_docs(bad, corpus["tok_uri"], str(tmp_path / "o"), val_fraction=VAL, shard_tokens=100)


def test_null_id_names_the_row(corpus, tmp_path: Path) -> None:
    schema = pa.schema([("text", pa.string()), ("id", pa.string())])
    rows = [{"text": "a", "id": "1"}, {"text": "b", "id": "2"}, {"text": "c", "id": None}]
    bad = publish_docs(tmp_path, [rows], tag="nullid", schema=schema)
    with pytest.raises(StageError, match=r"part_00000.parquet: row 2: field 'id' is null"):
        tokenize_docs(bad, corpus["tok_uri"], str(tmp_path / "o"), val_fraction=VAL, shard_tokens=100)


def test_all_empty_documents_is_an_error(corpus, tmp_path: Path) -> None:
    bad = publish_docs(tmp_path, [[{"text": "", "id": "1"}]], tag="empty")
    with pytest.raises(StageError, match="no non-empty documents"):
        tokenize_docs(bad, corpus["tok_uri"], str(tmp_path / "o"), val_fraction=VAL, shard_tokens=100)


def test_meta_json_contract(corpus) -> None:
    meta = json.loads((Path(corpus["res"].uri) / "meta.json").read_text())
    assert set(meta) >= {"dtype", "vocab_size", "bos_id", "splits"}
    for split in ("train", "val"):
        assert set(meta["splits"][split]) >= {"tokens", "docs", "shards"}
        for rel in meta["splits"][split]["shards"]:
            assert (Path(corpus["res"].uri) / rel).is_file()
            assert (Path(corpus["res"].uri) / rel.replace(".bin", ".idx.npy")).is_file()


def test_encode_methods_agree(corpus) -> None:
    """The numpy fast path and tiktoken's encode_ordinary_batch lay out identical streams."""
    from llm.data.tokenize import encode_docs

    tok = load_tokenizer(corpus["tok_uri"])
    texts = [d["text"] for d in corpus["docs"][:40]] + ["<|bos|> in text", "🚀"]
    a_tok, a_len = encode_docs(tok, texts, np.dtype(np.uint16), "numpy")
    b_tok, b_len = encode_docs(tok, texts, np.dtype(np.uint16), "batch")
    assert a_tok.dtype == b_tok.dtype == np.uint16
    assert np.array_equal(a_tok, b_tok) and np.array_equal(a_len, b_len)
    assert a_tok.tolist()[: a_len[0]] == [tok.bos_id] + tok.encode(texts[0])


def test_tokenizer_and_tokenize_on_s3(corpus, s3_bucket: S3Bucket) -> None:
    """Both stages read their inputs from and publish to a real S3 API; the shards match the local run."""
    root = f"s3://{s3_bucket.name}/artifacts"
    docs_uri = publish_docs(root, corpus["files"], row_group_size=16)
    cfg = corpus["cfg"].model_copy(deep=True)
    cfg.run.artifact_root = root
    cfg.tokenize.workers = 2  # spawned workers read the cached S3 objects too
    tok_res = execute("tokenizer", cfg, {"docs": docs_uri}, progress=False)
    assert tok_res.uri.startswith("s3://")
    tok = load_tokenizer(tok_res.uri)
    local_tok = load_tokenizer(corpus["tok_uri"])
    assert tok.mergeable_ranks() == local_tok.mergeable_ranks()
    res = execute("tokenize", cfg, {"docs": docs_uri, "tokenizer": tok_res.uri}, progress=False)
    assert res.manifest["counts"] == corpus["res"].manifest["counts"]
    for split in ("train", "val"):
        assert _split_docs(open_split(res.uri, split)) == _split_docs(open_split(corpus["res"].uri, split))


def test_invalid_utf8_names_file_row_and_field(corpus, tmp_path: Path) -> None:
    """Arrow does not check UTF-8 when reading parquet; both stages must, and name where it broke."""
    import pyarrow.parquet as pq

    from llm.stages.output import run_stage
    from llm.storage import Store

    text = pa.array([b"fine", b"also fine", b"bad \xff\xfe bytes"], pa.binary()).view(pa.string())

    def fn(out, inputs):
        pq.write_table(pa.table({"text": text, "id": ["1", "2", "3"]}), out.path("data/part_00000.parquet"))
        return {}

    bad = run_stage(Store(str(tmp_path)), "dedup", {"t": "utf8"}, {}, "test", fn).uri
    with pytest.raises(StageError, match=r"part_00000.parquet: row 2: field 'text' is not valid UTF-8"):
        tokenize_docs(bad, corpus["tok_uri"], str(tmp_path / "o"), val_fraction=VAL, shard_tokens=100)
    cfg = corpus["cfg"].model_copy(deep=True)
    cfg.run.artifact_root = str(tmp_path)
    with pytest.raises(StageError, match=r"row 2: field 'text' is not valid UTF-8"):
        execute("tokenizer", cfg, {"docs": bad}, progress=False)
