"""File names survive every data stage whatever the artifact root looks like, and a stage never publishes
fewer documents than it counts (issue 13, items 1 and 7a).

The default root is the relative ``./artifacts``; the listing used to cut ``len(root)`` characters off
every listed path, which had already lost its ``./``: two characters per stage, FineWeb's
``000_00000.parquet`` and ``010_00000.parquet`` collided after the filter, and ``ab.parquet`` became
the hidden ``.parquet`` that publishing drops, all behind an ``ok``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3_server import S3Bucket, moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

from llm.config import load_config
from llm.data.docs import check_published_docs
from llm.data.tokenize import check_published_tokens
from llm.stages.output import StageError, manifest_hash, verify_output
from llm.stages.registry import execute
from llm.storage import Store, cache_root, join

REPO = Path(__file__).resolve().parents[1]
FINEWEB_NAMES = ("000_00000.parquet", "010_00000.parquet", "ab.parquet")
ROWS = 40


def write_source(src: Path, names: tuple[str, ...], shared_data: Path, rows: int = ROWS) -> Path:
    """Real FineWeb-Edu rows under real FineWeb file names, a different slice per file."""
    table = pq.ParquetFile(shared_data / "pretrain" / "shard_00000.parquet").read_row_group(0)
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(i * rows, rows), src / name)
    return src


def stage_config(root: str, source: Path, **extra):
    return load_config("tiny", {"run.artifact_root": root, "download.source": f"{source}/*.parquet",
                                "download.max_files": None, "download.max_rows": None,
                                "filter.workers": 1, "dedup.workers": 1, **extra})


def data_names(manifest: dict) -> list[str]:
    return sorted(rel for rel in manifest["files"] if rel.startswith("data/"))


def published_rows(store: Store, uri: str, manifest: dict) -> int:
    return sum(pq.ParquetFile(store.cache_path(join(uri, rel))).metadata.num_rows for rel in data_names(manifest))


ROOTS = ["relative", "dot", "dotdot", "absolute", "symlink", "s3"]


@pytest.fixture(params=ROOTS)
def root(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An artifact root of one spelling, with the cwd set as a user running ``kiln`` there would have it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    kind = request.param
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"{bucket.uri}/runs"
    if kind == "symlink":
        (tmp_path / "real-artifacts").mkdir()
        (work / "artifacts").symlink_to(tmp_path / "real-artifacts", target_is_directory=True)
        return "artifacts"
    return {"relative": "artifacts", "dot": "./artifacts", "dotdot": "../up/artifacts",
            "absolute": str(tmp_path / "abs" / "artifacts")}[kind]


def test_names_and_counts_survive_every_stage(root: str, tmp_path: Path, shared_data: Path) -> None:
    src = write_source(tmp_path / "raw", FINEWEB_NAMES, shared_data)
    cfg = stage_config(root, src)
    store = Store(root)
    prev = None
    for stage in ("download", "filter", "dedup"):
        res = execute(stage, cfg, {} if prev is None else {"docs": prev.uri}, progress=False)
        assert verify_output(store, res.uri) is not None
        assert data_names(res.manifest) == [f"data/{n}" for n in FINEWEB_NAMES], stage
        assert published_rows(store, res.uri, res.manifest) == res.manifest["counts"]["docs_out"] > 0, stage
        if prev is not None:  # nothing lost between stages: this stage read everything the last published
            assert res.manifest["counts"]["docs_in"] == prev.manifest["counts"]["docs_out"], stage
        prev = res


def test_tokenize_counts_every_document_from_a_relative_root(tmp_path: Path, shared_data: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    src = write_source(tmp_path / "raw", FINEWEB_NAMES, shared_data)
    cfg = stage_config("./artifacts", src, **{"tokenizer.vocab_size": 300, "tokenizer.max_train_chars": 200_000,
                                              "tokenize.workers": 1, "tokenize.val_fraction": 0.1})
    docs = execute("download", cfg, {}, progress=False)
    tok = execute("tokenizer", cfg, {"docs": docs.uri}, progress=False)
    res = execute("tokenize", cfg, {"docs": docs.uri, "tokenizer": tok.uri}, progress=False)
    c = res.manifest["counts"]
    assert c["docs"] + c["empty_docs_skipped"] == len(FINEWEB_NAMES) * ROWS


def test_cli_filter_with_two_workers_on_the_default_root(tmp_path: Path, shared_data: Path) -> None:
    """The reported run: `kiln download` + `kiln filter` (workers=2) in a cwd with the default ./artifacts."""
    src = write_source(tmp_path / "raw", FINEWEB_NAMES[:2], shared_data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sets = ["--set", "run.artifact_root=./artifacts", "--set", f"download.source={src}/*.parquet",
            "--set", "download.max_files=null", "--set", "download.max_rows=null", "--set", "filter.workers=2"]
    for stage in ("download", "filter"):
        p = subprocess.run([sys.executable, "-m", "llm.cli", stage, "--preset", "tiny", *sets], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    (out,) = (tmp_path / "artifacts" / "filter").iterdir()
    manifest = json.loads((out / "manifest.json").read_text())
    assert data_names(manifest) == [f"data/{n}" for n in FINEWEB_NAMES[:2]]
    assert sum(pq.ParquetFile(out / rel).metadata.num_rows for rel in data_names(manifest)) \
        == manifest["counts"]["docs_out"]
    assert manifest["counts"]["docs_in"] == 2 * ROWS


# --------------------------------------------------------------------------- two inputs, one output name


def test_download_flattening_onto_an_existing_name_fails_naming_both(tmp_path: Path, shared_data: Path) -> None:
    src = write_source(tmp_path / "raw", ("a/b.parquet", "a__b.parquet"), shared_data)
    cfg = load_config("tiny", {"run.artifact_root": str(tmp_path / "artifacts"), "download.source": f"{src}/**/*.parquet",
                               "download.max_files": None, "download.max_rows": None})
    with pytest.raises(StageError) as e:
        execute("download", cfg, {}, progress=False)
    msg = str(e.value)
    assert str(src / "a" / "b.parquet") in msg and str(src / "a__b.parquet") in msg and "data/a__b.parquet" in msg
    assert "\n" not in msg


def test_download_of_a_hidden_file_fails_instead_of_vanishing_at_publish(tmp_path: Path, shared_data: Path) -> None:
    src = write_source(tmp_path / "raw", ("000_00000.parquet", ".010_00000.parquet"), shared_data)
    cfg = load_config("tiny", {"run.artifact_root": str(tmp_path / "artifacts"), "download.source": f"{src}/*.parquet",
                               "download.max_files": None, "download.max_rows": None})
    with pytest.raises(StageError, match=r"\.010_00000\.parquet"):
        execute("download", cfg, {}, progress=False)


def _hand_published_s3_docs(bucket: S3Bucket, files: dict[str, bytes]) -> str:
    """A stage output on S3 written object by object: S3 keys may hold what a local path cannot (``data//x``)."""
    client, prefix = bucket.client(), "runs/download/handmade"
    for rel, body in files.items():
        client.put_object(Bucket=bucket.name, Key=f"{prefix}/{rel}", Body=body)
    uri = f"{bucket.uri}/{prefix}"
    manifest = {"stage": "download", "uri": uri, "files": {rel: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                                               for rel, b in files.items()}, "counts": {}}
    manifest["hash"] = manifest_hash(manifest)
    client.put_object(Bucket=bucket.name, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest).encode())
    return uri


@pytest.mark.parametrize("stage", ["filter", "dedup"])
def test_two_s3_inputs_on_one_output_name_fail_naming_both(stage: str, s3_bucket: S3Bucket, tmp_path: Path,
                                                           shared_data: Path) -> None:
    src = write_source(tmp_path / "raw", ("x.parquet", "y.parquet"), shared_data)
    docs = _hand_published_s3_docs(s3_bucket, {"data/x.parquet": (src / "x.parquet").read_bytes(),
                                               "data//x.parquet": (src / "y.parquet").read_bytes()})
    cfg = load_config("tiny", {"run.artifact_root": f"{s3_bucket.uri}/runs", "filter.workers": 1, "dedup.workers": 1})
    with pytest.raises(StageError) as e:
        execute(stage, cfg, {"docs": docs}, progress=False)
    msg = str(e.value)
    assert f"{docs}/data/x.parquet" in msg and f"{docs}/data//x.parquet" in msg and "would both be written to data/x.parquet" in msg
    assert not Store(f"{s3_bucket.uri}/runs").list(f"{s3_bucket.uri}/runs/{stage}")  # nothing published


def test_distinct_s3_keys_get_distinct_cache_files_inside_the_cache(s3_bucket: S3Bucket) -> None:
    store = Store(s3_bucket.uri)
    bodies = {"p/data/x": b"plain", "p/data//x": b"double slash", "p/data/./x": b"dot", "p/../x": b"dotdot",
              "p/%2E%2E/x": b"escaped-looking"}
    for key, body in bodies.items():
        s3_bucket.client().put_object(Bucket=s3_bucket.name, Key=key, Body=body)
    cache = cache_root().resolve()
    for key, body in bodies.items():
        path = store.cache_path(f"{s3_bucket.uri}/{key}")
        assert path.read_bytes() == body, key
        assert path.resolve().is_relative_to(cache), key


def test_iter_files_names_are_relative_to_the_root_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root" / "d").mkdir(parents=True)
    (tmp_path / "root" / "d" / "ab.parquet").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    for uri in ("root", "./root", "root/", "./root//", "sub/../root", f"file://{tmp_path}/root", str(tmp_path / "root")):
        assert [rel for rel, _ in Store(uri).iter_files(uri)] == ["d/ab.parquet"], uri
    monkeypatch.chdir(tmp_path / "sub")
    assert [rel for rel, _ in Store("../root").iter_files("../root")] == ["d/ab.parquet"]


# --------------------------------------------------------------------------- published == counted


def test_count_check_refuses_a_work_dir_that_lost_documents(tmp_path: Path, shared_data: Path) -> None:
    src = write_source(tmp_path / "raw", FINEWEB_NAMES[:2], shared_data)
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for n in FINEWEB_NAMES[:2]:
        (work / "data" / n).write_bytes((src / n).read_bytes())
    names = [f"data/{n}" for n in FINEWEB_NAMES[:2]]
    check_published_docs("filter", work, names, 2 * ROWS)  # whole: fine
    with pytest.raises(StageError, match=r"hold 80 documents but the stage counted docs_out=81"):
        check_published_docs("filter", work, names, 2 * ROWS + 1)
    (work / "data" / FINEWEB_NAMES[1]).rename(work / "data" / f".{FINEWEB_NAMES[1]}")  # what publish would drop
    with pytest.raises(StageError, match=r"missing \['data/010_00000.parquet'\]"):
        check_published_docs("filter", work, names, 2 * ROWS)


def test_token_count_check_refuses_a_lost_shard(tmp_path: Path) -> None:
    from llm.data.shards import ShardWriter
    import numpy as np

    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=4)
    w.add(np.array([0, 5, 6, 0, 7, 0, 8, 9], dtype=np.uint16), np.array([3, 2, 3]))
    splits = {"train": w.close(), "val": {"tokens": 0, "docs": 0, "shards": []}}
    check_published_tokens(tmp_path, splits, np.dtype(np.uint16))
    with pytest.raises(StageError, match="counted 4 and 9"):
        check_published_tokens(tmp_path, {**splits, "train": {**splits["train"], "docs": 4, "tokens": 9}},
                               np.dtype(np.uint16))
    (tmp_path / splits["train"]["shards"][-1]).unlink()
    with pytest.raises(StageError, match="differ from the shards written"):
        check_published_tokens(tmp_path, splits, np.dtype(np.uint16))


# --------------------------------------------------------------------------- 7a: null text at download


@pytest.mark.parametrize("with_id", [True, False], ids=["as-is", "rewritten"])
def test_download_rejects_a_null_text_naming_file_and_row(with_id: bool, tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    texts = [f"document number {i} " * 5 for i in range(30)]
    texts[23] = None
    cols = {"text": pa.array(texts, pa.string())}
    if with_id:
        cols["id"] = pa.array([f"d{i}" for i in range(30)])
    pq.write_table(pa.table(cols), src / "000_00000.parquet", row_group_size=10)
    cfg = load_config("tiny", {"run.artifact_root": str(tmp_path / "artifacts"), "download.source": f"{src}/*.parquet",
                               "download.max_files": None, "download.max_rows": None})
    with pytest.raises(StageError) as e:
        execute("download", cfg, {}, progress=False)
    assert str(e.value) == f"{src / '000_00000.parquet'}: row 23: text is null"
