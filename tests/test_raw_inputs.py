"""Raw parquet (a folder or glob; local, s3:// or hf://) as the docs input of every data stage."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hub_server import HubServer
from llm.config import load_config
from llm.stages.output import StageError
from llm.stages.registry import execute, stage_key
from s3_server import S3Bucket, moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

# FineWeb's own shard names (000_00000.parquet, ...), not Kiln's shard_XXXXX.parquet.
NAMES = ("000_00000.parquet", "000_00001.parquet")


def write_raw(folder: Path, shared_data: Path, rows: int = 40) -> Path:
    """Two FineWeb-style files of real documents; the first holds 5 exact copies of its own rows."""
    folder.mkdir(parents=True, exist_ok=True)
    a = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet").slice(0, rows)
    b = pq.read_table(shared_data / "pretrain" / "shard_00001.parquet").slice(0, rows // 2)
    pq.write_table(pa.concat_tables([a, a.slice(0, 5)]), folder / NAMES[0])
    pq.write_table(b, folder / NAMES[1])
    (folder / "README.md").write_text("not data")  # a folder's other files are not inputs
    return folder


def cfg_for(root: Path | str, *overrides: str):
    return load_config("tiny", [f"run.artifact_root={root}", "dedup.workers=1", "filter.workers=1",
                                "tokenize.workers=1", "tokenizer.vocab_size=300", *overrides])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def raw(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A raw folder at ./raw of a chdir'd cwd (the default artifact root is relative too)."""
    monkeypatch.chdir(tmp_path)
    return write_raw(tmp_path / "raw", shared_data)


def test_dedup_reads_a_relative_raw_folder_from_the_cli(raw: Path, capsys) -> None:
    from llm.cli.main import main

    assert main(["dedup", "--input", "raw", "--output", "art", "--set", "dedup.workers=1", "--quiet"]) == 0
    assert "docs_in=65" in capsys.readouterr().out
    [m_path] = Path("art/dedup").glob("*/manifest.json")
    m = json.loads(m_path.read_text())
    assert m["counts"]["exact_dups"] == 5
    assert sorted(p.name for p in (m_path.parent / "data").glob("*.parquet")) == list(NAMES)
    src = m["inputs"]["docs"]["raw"]
    assert src["source"] == str(raw.absolute())
    assert [(f["name"], f["size"], f["sha256"]) for f in src["files"]] == [
        (n, (raw / n).stat().st_size, sha(raw / n)) for n in NAMES]


def test_folder_glob_and_copy_give_one_key_and_a_changed_file_a_new_one(raw: Path, tmp_path: Path) -> None:
    cfg = cfg_for("art")
    key, _ = stage_key("dedup", cfg, {"docs": "raw"})
    assert stage_key("dedup", cfg, {"docs": "raw/*.parquet"})[0] == key
    shutil.copytree(raw, tmp_path / "elsewhere" / "copy")
    assert stage_key("dedup", cfg, {"docs": str(tmp_path / "elsewhere" / "copy")})[0] == key
    # the fingerprint follows the content: one file's bytes change -> another key; a name too
    t = pq.read_table(raw / NAMES[1])
    pq.write_table(t.slice(1), raw / NAMES[1])
    changed = stage_key("dedup", cfg, {"docs": "raw"})[0]
    assert changed != key
    (raw / NAMES[1]).rename(raw / "000_00002.parquet")
    assert stage_key("dedup", cfg, {"docs": "raw"})[0] not in (key, changed)
    # and stages other than dedup key on it as well
    assert stage_key("filter", cfg, {"docs": "raw"})[0] != stage_key("filter", cfg, {"docs": "raw/000_00000.parquet"})[0]


def test_filter_tokenizer_and_tokenize_take_raw_inputs(raw: Path) -> None:
    cfg = cfg_for("art")
    filtered = execute("filter", cfg, {"docs": "raw/*.parquet"}, progress=False)
    assert filtered.manifest["counts"]["docs_in"] == 65
    assert filtered.manifest["inputs"]["docs"]["raw"]["source"].endswith("raw/*.parquet")
    tok = execute("tokenizer", cfg, {"docs": "raw"}, progress=False)
    assert tok.manifest["inputs"]["docs"]["raw"]["files"][0]["name"] == NAMES[0]
    tokens = execute("tokenize", cfg, {"docs": "raw", "tokenizer": tok.uri}, progress=False)
    assert tokens.manifest["counts"]["docs"] == 65 and tokens.manifest["counts"]["tokens"] > 1000


def test_s3_and_hf_raw_inputs_fetch_once_and_key_like_local(raw: Path, s3_bucket: S3Bucket,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same two files in a bucket and on a hub: the same key as the local folder, same output."""
    cfg = cfg_for("art")
    local_key, _ = stage_key("dedup", cfg, {"docs": "raw"})
    client = s3_bucket.client()
    for n in NAMES:
        client.upload_file(str(raw / n), s3_bucket.name, f"fineweb/sample/{n}")
    client.upload_file(str(raw / "README.md"), s3_bucket.name, "fineweb/sample/README.md")
    s3_uri = f"{s3_bucket.uri}/fineweb/sample/*.parquet"
    res = execute("dedup", cfg, {"docs": s3_uri}, progress=False)
    assert res.manifest["key"] == local_key and res.manifest["counts"]["exact_dups"] == 5
    assert [f["uri"] for f in res.manifest["inputs"]["docs"]["raw"]["files"]] == [
        f"{s3_bucket.uri}/fineweb/sample/{n}" for n in NAMES]
    monkeypatch.delenv("KILN_DATA_MIRROR", raising=False)  # an explicit hf:// input is read from the hub
    with HubServer(raw, repo="kiln-test/raw") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hf_uri = "hf://datasets/kiln-test/raw@main"
        assert stage_key("dedup", cfg, {"docs": hf_uri})[0] == local_key  # same content, same key
        assert any("/resolve/" in e.path for e in hub.log)  # its files were fetched to be fingerprinted
        m = execute("dedup", cfg, {"docs": hf_uri}, progress=False, force=True).manifest
    assert m["key"] == local_key and m["counts"]["exact_dups"] == 5
    assert m["inputs"]["docs"]["raw"]["source"] == hf_uri
    assert [f["name"] for f in m["inputs"]["docs"]["raw"]["files"]] == list(NAMES)


# --------------------------------------------------------------------------- bad input


def test_folder_without_parquet_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from llm.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no data")
    assert main(["dedup", "--input", "notes", "--output", "art", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes: no parquet files" in err
    with pytest.raises(StageError, match=r"notes/\*\.parquet: no parquet files"):
        execute("filter", cfg_for("art"), {"docs": "notes/*.parquet"}, progress=False)
    assert not Path("art").exists()  # refused before any work


def test_file_without_text_column_is_named_before_any_work(raw: Path, capsys) -> None:
    from llm.cli.main import main

    pq.write_table(pa.table({"body": ["x", "y"], "id": ["1", "2"]}), raw / "000_00009.parquet")
    assert main(["tokenize", "--input", "docs=raw", "--output", "art", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "000_00009.parquet: no 'text' column" in err
    assert not Path("art").exists()  # not even the tokenizer upstream ran


def test_tokenize_needs_ids_and_says_so_naming_the_file(raw: Path) -> None:
    """tokenizer and tokenize split documents by id hash: a raw file without ids is refused up front
    (filter and dedup need only text)."""
    t = pq.read_table(raw / NAMES[1], columns=["text"])
    pq.write_table(t, raw / NAMES[1])
    cfg = cfg_for("art")
    for stage in ("tokenizer", "tokenize"):
        inputs = {"docs": "raw"} | ({"tokenizer": "nope"} if stage == "tokenize" else {})
        with pytest.raises(StageError, match=rf"raw/{NAMES[1]}: no 'id' column"):
            execute(stage, cfg, inputs, progress=False)
    assert not Path("art").exists()
    assert stage_key("dedup", cfg, {"docs": "raw"})[0]  # dedup takes it


def test_unfinished_stage_output_is_not_read_as_raw(raw: Path) -> None:
    # a stage output whose manifest lists a file that is not there (damaged, or a copy in progress)
    (raw / "manifest.json").write_text(json.dumps({"stage": "filter", "hash": "x", "files": {
        "data/shard_00000.parquet": {"size": 10, "sha256": "00"}}}))
    with pytest.raises(StageError, match="does not verify"):
        execute("dedup", cfg_for("art"), {"docs": "raw"}, progress=False)
