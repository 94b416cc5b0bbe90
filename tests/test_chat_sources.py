"""Remote chat sources (hf:// on a local hub server, s3:// on moto) read through Kiln's verified
downloader: the same conversations as the local files, faults retried, clear errors, a cache reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubServer
from s3_server import S3Bucket, moto_server, s3_bucket  # noqa: F401  (pytest fixtures)
from test_chat_format import ByteTokenizer

from llm.chat.format import RenderedChats, render_many
from llm.chat.sources import chat_cache_dir, load_conversations
from llm.train.chat_stages import prepare_chats
from llm.config import load_config
from llm.stages.output import StageError
from llm.storage import Store

ROWS_PER_FILE = 60
TOK = ByteTokenizer()


def _write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=25)  # several row groups: footers add them up
    return path


def _sharegpt(table: pa.Table) -> pa.Table:
    """The same conversations in ShareGPT keys (conversations: from/value, human/gpt)."""
    names = {"user": "human", "assistant": "gpt"}
    convs = [[{"from": names[m["role"]], "value": m["content"]} for m in msgs] for msgs in table.column("messages").to_pylist()]
    return pa.table({"conversations": convs, "source": table.column("source")})


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A small chat dataset repo: two SmolTalk-schema shards, their ShareGPT twin, JSON lines, and a README."""
    root = tmp_path_factory.mktemp("chat-repo")
    val = pq.read_table(shared_data / "chat" / "val.parquet")
    first, second = val.slice(0, ROWS_PER_FILE), val.slice(ROWS_PER_FILE, ROWS_PER_FILE)
    _write(root / "data" / "train-00000.parquet", first)
    _write(root / "data" / "train-00001.parquet", second)
    _write(root / "sharegpt" / "train.parquet", _sharegpt(first))
    for name, part in (("part-0.jsonl", first), ("part-1.jsonl", second)):
        (root / "jsonl").mkdir(exist_ok=True)
        (root / "jsonl" / name).write_text("".join(json.dumps(r) + "\n" for r in part.to_pylist()))
    (root / "README.md").write_text("a chat dataset\n")
    return root


@pytest.fixture(scope="module")
def hub_server(repo_dir: Path):
    with HubServer(repo_dir, repo="kiln-test/smoltalk") as server:
        yield server


@pytest.fixture()
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """``repo_dir`` served as a hub dataset repo, with no faults and an empty request log; hub
    sources are not redirected to the offline mirror. (One server per module: stopping one costs ~0.5 s.)"""
    hub_server.faults.clear()
    hub_server.log.clear()
    monkeypatch.delenv("KILN_DATA_MIRROR", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    return hub_server


def load(uri: str, max_rows: int | None = None, **kw):
    return load_conversations(uri, max_rows=max_rows, max_chars=20_000, name="test", **kw)


def rendered(convs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = render_many(TOK, convs, vocab_size=TOK.vocab_size)
    return r.ids, r.mask, r.offsets


# --------------------------------------------------------------------------- hf://


def test_hf_source_matches_local_and_reuses_the_cache(hub: HubServer, repo_dir: Path) -> None:
    convs, report, schema = load(hub.source("data/train-*.parquet"))
    local, local_report, _ = load(str(repo_dir / "data"))
    assert schema == "smoltalk" and report.rows_in == 2 * ROWS_PER_FILE
    assert convs == local and report.as_dict() == local_report.as_dict()
    for name in ("train-00000.parquet", "train-00001.parquet"):
        assert hub.requests_for(f"/data/{name}") == [200]
        cached = list(chat_cache_dir().rglob(name))
        assert len(cached) == 1 and cached[0].read_bytes() == (repo_dir / "data" / name).read_bytes()
    again, _, _ = load(hub.source("data/train-*.parquet"))
    assert again == local
    for name in ("train-00000.parquet", "train-00001.parquet"):  # verified cache hits: not fetched again
        assert hub.requests_for(f"/data/{name}") == [200]


def test_truncated_download_is_retried(hub: HubServer, repo_dir: Path) -> None:
    hub.add_fault("truncate", match="*/train-00000.parquet", times=1, fraction=0.4)
    convs, _, _ = load(hub.source("data/train-00000.parquet"))
    assert len(hub.requests_for("/data/train-00000.parquet")) == 2  # the short one, then the rest
    assert convs == load(str(repo_dir / "data" / "train-00000.parquet"))[0]
    assert not list(chat_cache_dir().rglob("*.tmp"))  # the short body never stayed behind


def test_max_rows_fetches_only_the_files_it_needs(hub: HubServer) -> None:
    convs, report, _ = load(hub.source("data/train-*.parquet"), max_rows=ROWS_PER_FILE - 10)
    assert report.rows_in == ROWS_PER_FILE - 10
    assert hub.requests_for("/data/train-00001.parquet") == []
    _, report, _ = load(hub.source("data/train-*.parquet"), max_rows=ROWS_PER_FILE + 10)
    assert report.rows_in == ROWS_PER_FILE + 10
    assert hub.requests_for("/data/train-00000.parquet") == [200]  # the first call's file, reused
    assert hub.requests_for("/data/train-00001.parquet") == [200]


def test_jsonl_source_is_read_and_budgeted_by_lines(hub: HubServer, repo_dir: Path) -> None:
    convs, report, schema = load(hub.source("jsonl/*.jsonl"), max_rows=20)
    assert schema == "smoltalk" and report.rows_in == 20
    assert convs == load(str(repo_dir / "data"), max_rows=20)[0]
    assert hub.requests_for("/jsonl/part-1.jsonl") == []


def test_missing_sources_are_clear_errors_naming_the_uri(hub: HubServer) -> None:
    bad_rev = f"hf://datasets/{hub.repo}@nope/data/*.parquet"
    with pytest.raises(StageError, match=r"hf://datasets/kiln-test/smoltalk@nope/data/\*\.parquet.*HTTP 404"):
        load(bad_rev)
    assert len(hub.log) == 1  # a 404 is not retried
    with pytest.raises(StageError, match=r"kiln-test/smoltalk@main/data/test-\*\.parquet.*no \.parquet"):
        load(hub.source("data/test-*.parquet"))
    with pytest.raises(StageError, match=r"smoltalk@main/README\.md.*found only: README\.md"):
        load(hub.source("README.md"))
    # Listed, but the file itself is gone when fetched: named, and not retried.
    hub.add_fault("status", match="*/train-00001.parquet", times=None, status=404)
    with pytest.raises(StageError, match=r"smoltalk@main/data/train-\*\.parquet'?: .*/data/train-00001\.parquet: HTTP 404"):
        load(hub.source("data/train-*.parquet"))
    assert hub.requests_for("/data/train-00001.parquet") == [404]


def test_sharegpt_twin_on_the_hub_renders_like_smoltalk(hub: HubServer) -> None:
    share, share_report, share_schema = load(hub.source("sharegpt/train.parquet"))
    smol, _, smol_schema = load(hub.source("data/train-00000.parquet"))
    assert (share_schema, smol_schema) == ("sharegpt", "smoltalk")
    assert share_report.rows_kept == len(smol) > 0
    for a, b in zip(rendered(share), rendered(smol)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- s3://


def test_s3_object_and_prefix_glob(s3_bucket: S3Bucket, repo_dir: Path) -> None:
    store = Store(s3_bucket.uri)
    for name in ("train-00000.parquet", "train-00001.parquet"):
        store.put(repo_dir / "data" / name, f"{s3_bucket.uri}/chat/{name}")
    store.put(repo_dir / "README.md", f"{s3_bucket.uri}/chat/README.md")
    one, _, schema = load(f"{s3_bucket.uri}/chat/train-00001.parquet", s3_endpoint=s3_bucket.endpoint)
    assert schema == "smoltalk" and one == load(str(repo_dir / "data" / "train-00001.parquet"))[0]
    local = load(str(repo_dir / "data"))[0]
    assert load(f"{s3_bucket.uri}/chat/train-*.parquet")[0] == local  # endpoint from AWS_ENDPOINT_URL
    assert load(f"{s3_bucket.uri}/chat")[0] == local  # a bare prefix: its data files, README skipped
    assert len(list(chat_cache_dir().rglob("*.parquet"))) == 2  # each object cached once


# --------------------------------------------------------------------------- the stages' chat preparation


def _prepare(tmp: Path, train: str, val: str, max_rows: int | None = None) -> tuple[dict, dict[str, list[np.ndarray]]]:
    cfg = load_config("tiny", {"chat_data.train": train, "chat_data.val": val, "chat_data.max_rows": max_rows})
    reports = prepare_chats(cfg, TOK, tmp, max_tokens=512, progress=False)
    arrays = {}
    for split in ("train", "val"):
        r = RenderedChats.load(tmp, split, mmap=False)
        arrays[split] = [r.ids, r.mask, r.offsets]
    return {k: r.as_dict() for k, r in reports.items()}, arrays


def test_prepare_chats_from_the_hub_matches_local(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    remote, remote_arrays = _prepare(tmp_path / "hub", hub.source("data/train-*.parquet"), hub.source("sharegpt/*.parquet"))
    local, local_arrays = _prepare(tmp_path / "local", str(repo_dir / "data"), str(repo_dir / "sharegpt"))
    assert remote == local and remote["train"]["rows_in"] == 2 * ROWS_PER_FILE
    for split in ("train", "val"):
        for a, b in zip(remote_arrays[split], local_arrays[split]):
            np.testing.assert_array_equal(a, b)


def test_mirror_still_replaces_hub_sources(hub: HubServer, shared_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_DATA_MIRROR", str(shared_data))
    reports, _ = _prepare(tmp_path, hub.source("data/train-*.parquet"), hub.source("data/train-*.parquet"), max_rows=40)
    assert reports["train"]["rows_in"] == reports["val"]["rows_in"] == 40
    assert hub.log == []  # read from the mirror's chat/{train,val}.parquet; the hub never asked
