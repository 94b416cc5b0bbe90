"""The download stage against a local hub server (with injected faults), local files and S3."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubServer
from s3_server import S3Bucket, moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

from llm.config import load_config
from llm.fetch import DownloadError, fetch_files, glob_regex, list_files, pin_source, verify_parquet
from llm.stages.output import MANIFEST, StageError, verify_output
from llm.stages.registry import execute
from llm.storage import Store

TOKEN = "hf_test_token"
# Short backoff keeps the fault tests quick. The timeout is NOT short: a request that times out is
# retried, and every test here counts the requests the server saw. The hub server's first listing
# hashes ~50 MB of shards (~0.2 s idle, several times that on a loaded 2-core box), so a 1 s timeout
# turned a slow answer into an extra request. Only the stall test wants a short one, and sets it.
FAST = {"download.retries": 3, "download.backoff_s": 0.05, "download.timeout_s": 60.0}
# fetch_files' timeout in the tests that call it directly, for the same reason.
TIMEOUT_S = 60.0


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture()
def hub(shared_data: Path, monkeypatch: pytest.MonkeyPatch):
    """The offline kit's pretrain shards served in the hub layout; hub sources are not mirrored."""
    monkeypatch.delenv("KILN_DATA_MIRROR", raising=False)
    with HubServer(shared_data / "pretrain", repo="kiln-test/fineweb", token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def config(root: Path, source: str, **overrides):
    return load_config("tiny", {"run.artifact_root": str(root), "download.source": source, **FAST, **overrides})


def run_download(cfg):
    return execute("download", cfg, {}, progress=False)


def resolved(hub: HubServer, name: str) -> str:
    """The resolve URL path of a file at the commit the downloader pins."""
    return f"/resolve/{hub.commit}/{name}"


def no_manifest_under(root: Path) -> bool:
    return not list(root.rglob(MANIFEST))


def write_parquet(path: Path, table: pa.Table, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kw)
    return path


# --------------------------------------------------------------------------- hub: happy path and faults


def test_hub_download_happy_path(hub: HubServer, shared_data: Path, artifact_root: Path) -> None:
    res = run_download(config(artifact_root, hub.source("*.parquet"), **{"download.max_files": 2}))
    m = res.manifest
    assert not res.cached
    assert m["counts"]["files"] == 2 and m["counts"]["rows"] == 2885 * 2
    assert m["counts"]["bytes"] == sum((shared_data / "pretrain" / f"shard_0000{i}.parquet").stat().st_size for i in (0, 1))
    assert m["source"] == hub.source("*.parquet")
    assert set(m["files"]) == {"data/shard_00000.parquet", "data/shard_00001.parquet"}
    assert m["shards"]["shard_00001.parquet"]["rows"] == 2885
    # the branch was resolved once, and everything after it named that commit, not the branch
    assert m["source_revision"] == "main" and m["source_commit"] == hub.commit
    assert m["pinned_source"] == f"hf://datasets/{hub.repo}@{hub.commit}/*.parquet"
    assert hub.requests_for("/revision/main") == [200]
    assert not [e for e in hub.log if "/tree/main" in e.path or "/resolve/main/" in e.path]
    assert m["shards"]["shard_00001.parquet"]["source"].endswith(f"@{hub.commit}/shard_00001.parquet")
    for name in ("shard_00000.parquet", "shard_00001.parquet"):  # the hub's bytes, unchanged
        assert sha256(Path(res.uri) / "data" / name) == sha256(shared_data / "pretrain" / name)
    assert hub.requests_for(f"/tree/{hub.commit}")  # listed through the tree API
    assert hub.requests_for(resolved(hub, "shard_00002.parquet")) == []  # max_files respected
    assert m["counts"]["transferred_bytes"] == m["counts"]["bytes"]  # a clean fetch: each byte once
    assert not (Path(res.uri) / "_raw").exists()

    again = run_download(config(artifact_root, hub.source("*.parquet"), **{"download.max_files": 2}))
    assert again.cached and again.uri == res.uri


def test_hub_requires_token_and_names_the_problem(hub: HubServer, artifact_root: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StageError, match="HTTP 401.*HF_TOKEN"):
        run_download(config(artifact_root, hub.source("*.parquet"), **{"download.max_files": 1}))
    assert no_manifest_under(artifact_root)


def test_unknown_revision_is_an_immediate_error(hub: HubServer, artifact_root: Path) -> None:
    src = f"hf://datasets/{hub.repo}@nope/*.parquet"
    with pytest.raises(StageError, match="revision 'nope' of dataset kiln-test/fineweb: HTTP 404"):
        run_download(config(artifact_root, src, **{"download.max_files": 1}))
    assert hub.requests_for("/revision/nope") == [404]  # not retried
    assert not [e for e in hub.log if "/tree/" in e.path]  # nothing listed
    assert no_manifest_under(artifact_root)


def test_pin_source_resolves_a_branch_once_and_keeps_a_commit(hub: HubServer) -> None:
    pinned, commit = pin_source(hub.source("sub/*.parquet"))
    assert commit == hub.commit and pinned == f"hf://datasets/{hub.repo}@{hub.commit}/sub/*.parquet"
    assert pin_source(pinned) == (pinned, hub.commit)  # already a commit: no second request
    assert hub.requests_for(f"/revision/{hub.commit}") == [] and len(hub.requests_for("/revision/main")) == 1
    assert pin_source("/some/local/*.parquet") == ("/some/local/*.parquet", None)


def test_truncated_transfer_resumes_with_a_range_request(hub: HubServer, shared_data: Path, artifact_root: Path) -> None:
    src = shared_data / "pretrain/shard_00000.parquet"
    size = src.stat().st_size  # ~12.5 MB
    hub.add_fault("truncate", match="*/shard_00000.parquet", times=2, fraction=0.3)
    res = run_download(config(artifact_root, hub.source("*.parquet"), **{"download.max_files": 1}))
    name = resolved(hub, "shard_00000.parquet")
    first = int(size * 0.3)  # what the first, cut, response delivered
    second = first + int((size - first) * 0.3)  # plus 30% of the remainder from the second
    assert hub.requests_for(name) == [200, 206, 206]
    assert hub.ranges_for(name) == [None, f"bytes={first}-", f"bytes={second}-"]  # only the missing bytes
    assert sha256(Path(res.uri) / "data/shard_00000.parquet") == sha256(src)
    assert res.manifest["counts"]["transferred_bytes"] == size  # before ranged resume: 1.6x size


@pytest.mark.parametrize("mode", ["ignore", "none"])
def test_server_without_ranges_gets_the_whole_file_again(hub: HubServer, shared_data: Path, tmp_path: Path,
                                                         mode: str) -> None:
    # "ignore": advertises Accept-Ranges but answers a Range with 200 and the whole file;
    # "none": advertises nothing, so no Range is sent at all.
    hub.range_mode = mode
    src = shared_data / "pretrain/shard_00002.parquet"
    hub.add_fault("truncate", match="*/shard_00002.parquet", times=1, fraction=0.5)
    got = fetch_files(hub.source("shard_00002.parquet"), tmp_path / "dl", retries=2, backoff_s=0.01, timeout_s=TIMEOUT_S)
    name = resolved(hub, "shard_00002.parquet")
    assert hub.requests_for(name) == [200, 200]
    assert hub.ranges_for(name) == [None, f"bytes={src.stat().st_size // 2}-" if mode == "ignore" else None]
    assert got[0].path.read_bytes() == src.read_bytes()
    assert got[0].transferred == src.stat().st_size // 2 + src.stat().st_size


def test_partial_answer_for_another_object_is_not_spliced_in(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    # A 206 whose Content-Range total is not the listed size describes some other object: its
    # bytes are not appended; the prefix is dropped and the file fetched whole.
    hub.range_mode = "wrong_total"
    src = shared_data / "pretrain/shard_00001.parquet"
    hub.add_fault("truncate", match="*/shard_00001.parquet", times=1, fraction=0.5)
    got = fetch_files(hub.source("shard_00001.parquet"), tmp_path / "dl", retries=3, backoff_s=0.01, timeout_s=TIMEOUT_S)
    name = resolved(hub, "shard_00001.parquet")
    assert hub.requests_for(name) == [200, 206, 200]
    assert hub.ranges_for(name) == [None, f"bytes={src.stat().st_size // 2}-", None]
    assert got[0].path.read_bytes() == src.read_bytes()


def test_bad_prefix_after_a_resume_restarts_from_zero_once(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    # The first response is cut short AND has a flipped byte: the ranged remainder is fine, but the
    # joined file fails the hub's sha256, so the prefix is thrown away and the file fetched whole.
    src = shared_data / "pretrain/shard_00003.parquet"
    hub.add_fault("truncate", match="*/shard_00003.parquet", times=1, fraction=0.3, corrupt=True)
    got = fetch_files(hub.source("shard_00003.parquet"), tmp_path / "dl", retries=3, backoff_s=0.01, timeout_s=TIMEOUT_S)
    name = resolved(hub, "shard_00003.parquet")
    assert hub.requests_for(name) == [200, 206, 200]
    assert hub.ranges_for(name) == [None, f"bytes={int(src.stat().st_size * 0.3)}-", None]
    assert got[0].path.read_bytes() == src.read_bytes()


def test_zero_byte_body_is_retried(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    hub.add_fault("empty", match="*/shard_00001.parquet", times=1)
    got = fetch_files(hub.source("shard_00001.parquet"), tmp_path / "dl", retries=2, backoff_s=0.01, timeout_s=TIMEOUT_S)
    assert len(hub.requests_for(resolved(hub, "shard_00001.parquet"))) == 2
    assert got[0].rows == 2885 and sha256(got[0].path) == sha256(shared_data / "pretrain/shard_00001.parquet")


def test_persistent_truncation_fails_and_publishes_nothing(hub: HubServer, artifact_root: Path) -> None:
    hub.add_fault("truncate", match="*/shard_00001.parquet", times=None)
    with pytest.raises(StageError) as err:
        run_download(config(artifact_root, hub.source("*.parquet"), **{"download.max_files": 2}))
    msg = str(err.value)
    assert "shard_00001.parquet" in msg and "4 attempts" in msg
    assert len(hub.requests_for(resolved(hub, "shard_00001.parquet"))) == 4  # 1 + retries
    assert no_manifest_under(artifact_root)
    # the truncated bytes never appear under the file's real name
    assert not list(artifact_root.rglob("shard_00001.parquet"))
    assert not list(artifact_root.rglob("*.tmp"))


def test_server_errors_are_retried(hub: HubServer, shared_data: Path, artifact_root: Path) -> None:
    hub.add_fault("status", match="*/revision/*", times=1, status=500)
    hub.add_fault("status", match="*/tree/*", times=1, status=502)
    hub.add_fault("status", match="*/shard_00000.parquet", times=2, status=503)
    res = run_download(config(artifact_root, hub.source("*.parquet"), **{"download.max_files": 1}))
    assert hub.requests_for(resolved(hub, "shard_00000.parquet")) == [503, 503, 200]
    assert hub.requests_for(f"/tree/{hub.commit}") == [502, 200]
    assert hub.requests_for("/revision/main") == [500, 200]
    assert res.manifest["counts"]["rows"] == 2885


def test_stall_times_out_and_is_retried(hub: HubServer, shared_data: Path, artifact_root: Path) -> None:
    # A 3 s timeout against a 60 s stall: the gap between them, not a tight bound on the loaded box's
    # speed, is what shows the client gave up on the stall instead of waiting it out. (3 s is far
    # above any pause in a healthy loopback transfer, so only the stall times out.)
    hub.add_fault("stall", match="*/shard_00000.parquet", times=1, seconds=60)
    t0 = time.monotonic()
    res = run_download(config(artifact_root, hub.source("*.parquet"),
                              **{"download.max_files": 1, "download.timeout_s": 3.0}))
    assert time.monotonic() - t0 < 30  # gave up after ~timeout_s; waiting the stall out takes > 60 s
    # the retry continues from what had arrived before the stall (at most the half that was sent;
    # a read cut by the timeout may lose its last partial block)
    first, retry = hub.ranges_for(resolved(hub, "shard_00000.parquet"))
    size = (shared_data / "pretrain/shard_00000.parquet").stat().st_size
    assert first is None and retry.startswith("bytes=") and 0 < int(retry[6:-1]) <= size // 2
    assert sha256(Path(res.uri) / "data/shard_00000.parquet") == sha256(shared_data / "pretrain/shard_00000.parquet")


def test_plain_https_file_without_hub_token(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    # e.g. an eval bundle at a plain URL: fetched and size-checked, and the hub token is not sent
    hub.token = None
    url = f"{hub.url}/datasets/{hub.repo}/resolve/main/README.md"
    hub.add_fault("truncate", match="*/README.md", times=1)
    got = fetch_files(url, tmp_path / "dl", retries=1, backoff_s=0.01)
    assert got[0].rel == "README.md" and got[0].path.read_bytes() == (shared_data / "pretrain/README.md").read_bytes()
    hub.token = TOKEN  # HF_TOKEN holds it, but a non-hub URL must not receive it
    with pytest.raises(StageError, match="HTTP 401"):
        fetch_files(url, tmp_path / "dl2", retries=0)


def test_paginated_tree_listing(hub: HubServer) -> None:
    hub.page_size = 2
    files = list_files(hub.source("*.parquet"))
    assert [f.rel for f in files] == [f"shard_0000{i}.parquet" for i in range(4)]
    assert all(f.sha256 and f.size for f in files)
    assert len(hub.requests_for(f"/tree/{hub.commit}")) == 3  # README + 4 shards, 2 per page


def test_hub_server_speaks_the_real_client_protocol(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    """The fake hub must look like the real one to huggingface_hub, or the fault tests prove little."""
    from huggingface_hub import HfApi, hf_hub_download

    hub.page_size = 2
    api = HfApi(endpoint=hub.url, token=TOKEN)
    listed = {e.path: e.size for e in api.list_repo_tree(hub.repo, repo_type="dataset", recursive=True)}
    assert listed == {p.name: p.stat().st_size for p in (shared_data / "pretrain").iterdir()}
    assert api.dataset_info(hub.repo, revision="main").sha == hub.commit  # the revision endpoint's shape
    from huggingface_hub.errors import RevisionNotFoundError

    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(hub.repo, revision="nope")
    got = hf_hub_download(hub.repo, "shard_00003.parquet", repo_type="dataset", endpoint=hub.url, token=TOKEN,
                          revision=hub.commit, cache_dir=tmp_path / "hf-cache")
    assert sha256(Path(got)) == sha256(shared_data / "pretrain/shard_00003.parquet")


# --------------------------------------------------------------------------- resume and budgets


def test_resume_skips_verified_files(hub: HubServer, artifact_root: Path) -> None:
    # First run: shard 0 arrives, shard 1 keeps failing, so the stage fails (sequentially, one worker).
    fault = hub.add_fault("status", match="*/shard_00001.parquet", times=None, status=500)
    cfg = config(artifact_root, hub.source("*.parquet"), **{"download.max_files": 2, "download.workers": 1,
                                                             "download.retries": 1})
    with pytest.raises(StageError, match="shard_00001.parquet"):
        run_download(cfg)
    assert no_manifest_under(artifact_root)
    fault.times = 0  # the hub recovers
    res = run_download(cfg)
    assert len(hub.requests_for(resolved(hub, "shard_00000.parquet"))) == 1  # not fetched again
    assert res.manifest["counts"]["resumed_files"] == 1 and res.manifest["counts"]["files"] == 2
    assert res.manifest["shards"]["shard_00000.parquet"]["resumed"] is True


def test_resume_refetches_a_corrupt_leftover(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dl"
    first = fetch_files(hub.source("*.parquet"), dest, max_files=2, workers=2)
    assert [f.resumed for f in first] == [False, False]
    # a later run finds one file whole and one cut short (e.g. a copy interrupted by hand)
    good = shared_data / "pretrain/shard_00001.parquet"
    (dest / "shard_00001.parquet").write_bytes(good.read_bytes()[: 1000])
    second = fetch_files(hub.source("*.parquet"), dest, max_files=2, workers=2)
    assert [f.resumed for f in second] == [True, False]
    assert len(hub.requests_for(resolved(hub, "shard_00000.parquet"))) == 1
    assert len(hub.requests_for(resolved(hub, "shard_00001.parquet"))) == 2
    assert sha256(dest / "shard_00001.parquet") == sha256(good)
    # same size, still valid parquet, other bytes (e.g. fetched at an older commit of the branch):
    # the listing's sha256 tells, so it is fetched again rather than kept
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dest / "shard_00001.parquet").write_bytes(bytes(data))
    assert verify_parquet(dest / "shard_00001.parquet") == 2885
    third = fetch_files(hub.source("*.parquet"), dest, max_files=2, workers=2)
    assert [f.resumed for f in third] == [True, False]
    assert sha256(dest / "shard_00001.parquet") == sha256(good)


def test_max_rows_budget_is_exact(hub: HubServer, shared_data: Path, artifact_root: Path) -> None:
    cfg = config(artifact_root, hub.source("*.parquet"), **{"download.max_files": None, "download.max_rows": 3000,
                                                             "download.workers": 1})
    res = run_download(cfg)
    assert res.manifest["counts"]["rows"] == 3000 and res.manifest["counts"]["files"] == 2
    assert hub.requests_for(resolved(hub, "shard_00002.parquet")) == []  # stopped at the budget
    cut = pq.read_table(Path(res.uri) / "data/shard_00001.parquet")
    original = pq.read_table(shared_data / "pretrain/shard_00001.parquet")
    assert cut.num_rows == 115
    assert cut.schema == original.schema
    assert cut.column("id").to_pylist() == original.column("id").to_pylist()[:115]
    assert res.manifest["shards"]["shard_00001.parquet"]["source_rows"] == 2885
    assert verify_parquet(Path(res.uri) / "data/shard_00001.parquet") == 115


def test_max_rows_within_the_first_file(shared_data: Path, artifact_root: Path) -> None:
    res = run_download(config(artifact_root, str(shared_data / "pretrain/*.parquet"),
                              **{"download.max_files": None, "download.max_rows": 10}))
    assert res.manifest["counts"] == {**res.manifest["counts"], "files": 1, "rows": 10}


# --------------------------------------------------------------------------- a partial download across runs

# Runs the download stage in a child process, so the test can kill it the way an OOM killer,
# a preempted node or Ctrl-C would.
_STAGE_CHILD = """
import json, sys
from llm.config import load_config
from llm.stages.registry import execute
execute("download", load_config("tiny", json.loads(sys.argv[1])), {}, progress=False)
"""


def partial_of(dest: Path, name: str) -> tuple[Path, Path]:
    """The in-progress file of ``name`` in ``dest`` and its sidecar."""
    return dest / f".{name}.part", dest / f".{name}.part.json"


def sidecar_have(sidecar: Path) -> int:
    return json.loads(sidecar.read_text())["have"]


def leave_partial(hub: HubServer, dest: Path, name: str, fraction: float = 0.5, **kw) -> int:
    """A first run that gives up on a cut-off transfer (the network, not the file): it keeps what
    arrived for the next run. Returns the byte count its sidecar vouches for."""
    hub.add_fault("truncate", match=f"*/{name}", times=1, fraction=fraction)
    with pytest.raises(StageError, match="failed after 1 attempts"):
        fetch_files(kw.pop("source", hub.source(name)), dest, retries=0, timeout_s=TIMEOUT_S, **kw)
    part, sidecar = partial_of(dest, name)
    have = sidecar_have(sidecar)
    assert part.stat().st_size == have  # every byte that arrived, counted exactly
    return have


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_interrupted_stage_is_continued_by_the_next_run(hub: HubServer, shared_data: Path, artifact_root: Path,
                                                        how: signal.Signals) -> None:
    name = "shard_00000.parquet"
    src = shared_data / "pretrain" / name
    size = src.stat().st_size
    # Most of the file arrives, then the server goes quiet, as a dying link would.
    hub.add_fault("stall", match=f"*/{name}", times=1, fraction=0.9, seconds=60)
    overrides = {"run.artifact_root": str(artifact_root), "download.source": hub.source("*.parquet"), **FAST,
                 "download.max_files": 1, "download.workers": 1}
    # The child's timeout bounds how long Ctrl-C waits for the stalled read (timeouts are not part of
    # the stage's key, so the rerun below continues the same output). It must also outlast the time
    # this test takes to see the partial and send the signal: with 2 s, a loaded machine let the
    # child's retry finish the file first, and the "interrupted" child exited 0.
    child = subprocess.Popen([sys.executable, "-c", _STAGE_CHILD, json.dumps({**overrides, "download.timeout_s": 10.0})],
                             cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(artifact_root.rglob(f".{name}.part.json")):  # bytes are on disk and accounted for
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child never recorded a partial download"
            time.sleep(0.05)
        child.send_signal(how)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0 and no_manifest_under(artifact_root)
    if how == signal.SIGINT:
        assert b"KeyboardInterrupt" in err, err.decode()[-2000:]
    (sidecar,) = artifact_root.rglob(f".{name}.part.json")
    part = sidecar.with_name(f".{name}.part")
    have = sidecar_have(sidecar)
    assert 0 < have < size and part.stat().st_size >= have
    if how == signal.SIGINT:  # a stop the process sees records the exact count on its way out
        assert part.stat().st_size == have
    before = len(hub.logged(resolved(hub, name)))

    res = run_download(config(artifact_root, hub.source("*.parquet"), **{"download.max_files": 1}))
    again = hub.logged(resolved(hub, name))[before:]
    # only the remainder was asked for, guarded by the validator the first run was given
    assert [(e.status, e.range, e.if_range) for e in again] == [(206, f"bytes={have}-", f'"{sha256(src)}"')]
    assert sha256(Path(res.uri) / "data" / name) == sha256(src)
    shard = res.manifest["shards"][name]
    assert (shard["reused_bytes"], shard["transferred_bytes"]) == (have, size - have)
    assert res.manifest["counts"]["reused_bytes"] == have and res.manifest["counts"]["transferred_bytes"] == size - have
    assert not list(artifact_root.rglob(".*.part*"))


@pytest.mark.parametrize("stale", ["commit", "size"])
def test_partial_of_another_commit_or_size_is_discarded(hub: HubServer, shared_data: Path, tmp_path: Path,
                                                        stale: str) -> None:
    name = "shard_00001.parquet"
    src = shared_data / "pretrain" / name
    dest = tmp_path / "dl"
    leave_partial(hub, dest, name)
    part, sidecar = partial_of(dest, name)
    meta = json.loads(sidecar.read_text())
    if stale == "commit":  # left by a run that read the branch when it pointed elsewhere
        meta["url"] = meta["url"].replace(hub.commit, "0" * 40)
    else:
        meta["size"] += 1
    sidecar.write_text(json.dumps(meta))
    before = len(hub.logged(resolved(hub, name)))
    (got,) = fetch_files(hub.source(name), dest, retries=0, timeout_s=TIMEOUT_S)
    assert [(e.status, e.range) for e in hub.logged(resolved(hub, name))[before:]] == [(200, None)]  # from byte 0
    assert got.path.read_bytes() == src.read_bytes()
    assert (got.reused_bytes, got.transferred) == (0, src.stat().st_size)
    assert not part.exists() and not sidecar.exists()


def test_changed_validator_gets_the_whole_file(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    # The server no longer vouches for the first run's bytes (If-Range does not match): it answers
    # the ranged request with 200 and the whole file, which replaces the prefix.
    name = "shard_00002.parquet"
    src = shared_data / "pretrain" / name
    dest = tmp_path / "dl"
    have = leave_partial(hub, dest, name)
    hub.etag_suffix = "-reissued"
    before = len(hub.logged(resolved(hub, name)))
    (got,) = fetch_files(hub.source(name), dest, retries=0, timeout_s=TIMEOUT_S)
    assert [(e.status, e.range, e.if_range) for e in hub.logged(resolved(hub, name))[before:]] == \
        [(200, f"bytes={have}-", f'"{sha256(src)}"')]
    assert got.path.read_bytes() == src.read_bytes()
    assert (got.reused_bytes, got.transferred) == (0, src.stat().st_size)
    assert not any(partial_of(dest, name)[i].exists() for i in (0, 1))


def test_corrupt_prefix_from_an_earlier_run_is_refetched_once(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    name = "shard_00003.parquet"
    src = shared_data / "pretrain" / name
    size = src.stat().st_size
    dest = tmp_path / "dl"
    have = leave_partial(hub, dest, name)
    part, _ = partial_of(dest, name)
    data = bytearray(part.read_bytes())
    data[have // 2] ^= 0xFF  # the disk, or someone, changed a byte between the runs
    part.write_bytes(bytes(data))
    before = len(hub.logged(resolved(hub, name)))
    (got,) = fetch_files(hub.source(name), dest, retries=2, backoff_s=0.01, timeout_s=TIMEOUT_S)
    # continued, caught by the listed sha256, then fetched whole once
    assert [(e.status, e.range) for e in hub.logged(resolved(hub, name))[before:]] == [(206, f"bytes={have}-"), (200, None)]
    assert got.path.read_bytes() == src.read_bytes()
    assert (got.reused_bytes, got.transferred) == (0, size - have + size)


def test_deterministic_failure_removes_the_partial(hub: HubServer, tmp_path: Path) -> None:
    name = "shard_00001.parquet"
    dest = tmp_path / "dl"
    have = leave_partial(hub, dest, name)
    hub.add_fault("status", match=f"*/{name}", times=1, status=404)
    with pytest.raises(StageError, match="HTTP 404"):
        fetch_files(hub.source(name), dest, retries=3, backoff_s=0.01, timeout_s=TIMEOUT_S)
    assert hub.logged(resolved(hub, name))[-1].range == f"bytes={have}-"
    assert not any(partial_of(dest, name)[i].exists() for i in (0, 1))


@pytest.mark.parametrize("etag", ["strong", "weak"])
def test_unpinned_url_is_continued_only_with_a_strong_etag(hub: HubServer, shared_data: Path, tmp_path: Path,
                                                           etag: str) -> None:
    # A plain URL at a branch can serve other bytes next time; only a strong ETag (sent as If-Range)
    # lets the next run continue it. A weak one cannot vouch for bytes: the partial is not kept.
    name = "shard_00002.parquet"
    src = shared_data / "pretrain" / name
    url = f"{hub.url}/datasets/{hub.repo}/resolve/main/{name}"
    hub.token = None
    hub.weak_etags = etag == "weak"
    dest = tmp_path / "dl"
    hub.add_fault("truncate", match=f"*/{name}", times=1, fraction=0.5)
    with pytest.raises(StageError, match="failed after 1 attempts"):
        fetch_files(url, dest, retries=0, timeout_s=TIMEOUT_S)
    part, sidecar = partial_of(dest, name)
    assert part.exists() == sidecar.exists() == (etag == "strong")
    (got,) = fetch_files(url, dest, retries=0, timeout_s=TIMEOUT_S)
    last = hub.logged(f"/resolve/main/{name}")[-1]
    half = src.stat().st_size // 2
    if etag == "strong":
        assert (last.status, last.range, last.if_range, got.reused_bytes) == (206, f"bytes={half}-", f'"{sha256(src)}"', half)
    else:
        assert (last.status, last.range, got.reused_bytes) == (200, None, 0)
    assert got.path.read_bytes() == src.read_bytes()


def test_partial_held_by_another_process_is_left_alone(hub: HubServer, shared_data: Path, tmp_path: Path) -> None:
    # Two processes sharing a directory (a common cache): the one without the lock fetches into a
    # private temp file and neither reads nor removes the other's partial.
    from filelock import FileLock

    name = "shard_00000.parquet"
    dest = tmp_path / "dl"
    leave_partial(hub, dest, name)
    part, sidecar = partial_of(dest, name)
    held = part.read_bytes(), sidecar.read_text()
    with FileLock(dest / f".{name}.part.lock"):
        (got,) = fetch_files(hub.source(name), dest, retries=0, timeout_s=TIMEOUT_S)
    assert hub.logged(resolved(hub, name))[-1].range is None
    assert got.path.read_bytes() == (shared_data / "pretrain" / name).read_bytes() and got.reused_bytes == 0
    assert (part.read_bytes(), sidecar.read_text()) == held
    assert not list(dest.glob("*.tmp"))


# --------------------------------------------------------------------------- local and S3 sources


def test_local_glob_and_directory_sources(shared_data: Path, artifact_root: Path, monkeypatch) -> None:
    monkeypatch.delenv("KILN_DATA_MIRROR")
    res = run_download(config(artifact_root, str(shared_data / "pretrain/*.parquet"), **{"download.max_files": 1}))
    assert res.manifest["counts"]["files"] == 1
    assert sha256(Path(res.uri) / "data/shard_00000.parquet") == sha256(shared_data / "pretrain/shard_00000.parquet")
    # a bare directory means its parquet files (the README next to them is not a shard)
    res2 = run_download(config(artifact_root, str(shared_data / "pretrain"), **{"download.max_files": 1}))
    assert res2.uri != res.uri and set(res2.manifest["files"]) == {"data/shard_00000.parquet"}


def test_mirror_replaces_hub_source(shared_data: Path, artifact_root: Path, capsys) -> None:
    # KILN_DATA_MIRROR is set by conftest: the default hub source reads the offline kit instead.
    cfg = load_config("tiny", {"run.artifact_root": str(artifact_root), "download.max_files": 1})
    res = run_download(cfg)
    assert "data mirror in use" in capsys.readouterr().err  # never silently
    assert res.manifest["resolved_source"].startswith(str(shared_data.resolve()))
    assert res.manifest["counts"]["rows"] == 2885
    assert res.manifest["source_commit"] is None and res.manifest["source_revision"] is None  # no hub asked
    assert res.manifest["budget_short"] is False


def test_a_file_budget_the_source_cannot_meet_is_said(shared_data: Path, artifact_root: Path, capsys) -> None:
    res = run_download(config(artifact_root, str(shared_data / "pretrain" / "*.parquet"), **{"download.max_files": 9}))
    assert res.manifest["counts"]["files"] == 4 and res.manifest["budget_short"] is True
    err = capsys.readouterr().err
    assert "download.max_files=9 but" in err and "has only 4 matching files" in err
    assert "data mirror in use" not in err  # a local source is read as given


def test_s3_source(s3_bucket: S3Bucket, shared_data: Path, artifact_root: Path) -> None:
    client = s3_bucket.client()
    src = shared_data / "pretrain/shard_00003.parquet"
    client.upload_file(str(src), s3_bucket.name, "corpus/part/shard_00003.parquet")
    client.put_object(Bucket=s3_bucket.name, Key="corpus/part/notes.txt", Body=b"not a shard")
    res = run_download(config(artifact_root, f"s3://{s3_bucket.name}/corpus/part/*.parquet"))
    assert res.manifest["counts"] == {**res.manifest["counts"], "files": 1, "rows": 2883}
    assert sha256(Path(res.uri) / "data/shard_00003.parquet") == sha256(src)


def test_s3_artifact_root(s3_bucket: S3Bucket, shared_data: Path) -> None:
    root = f"s3://{s3_bucket.name}/artifacts"
    cfg = config(Path("unused"), str(shared_data / "pretrain/*.parquet"),
                 **{"run.artifact_root": root, "download.max_rows": 50})
    res = run_download(cfg)
    assert res.uri.startswith(root)
    store = Store(root)
    assert verify_output(store, res.uri) is not None
    local = store.cache_path(res.uri + "/data/shard_00000.parquet")
    assert pq.read_metadata(local).num_rows == 50
    assert run_download(cfg).cached


# --------------------------------------------------------------------------- bad input


def test_shard_without_text_column(tmp_path: Path, artifact_root: Path) -> None:
    write_parquet(tmp_path / "src/a.parquet", pa.table({"content": ["hello"], "id": ["1"]}))
    with pytest.raises(StageError, match=r"a\.parquet: no 'text' column \(columns: content, id\)"):
        run_download(config(artifact_root, str(tmp_path / "src/*.parquet")))
    assert no_manifest_under(artifact_root)
    # naming the column makes it the output's `text`
    res = run_download(config(artifact_root, str(tmp_path / "src/*.parquet"), **{"download.text_column": "content"}))
    out = pq.read_table(Path(res.uri) / "data/a.parquet")
    assert out.column("text").to_pylist() == ["hello"] and "content" not in out.column_names


def test_empty_shard(tmp_path: Path, artifact_root: Path) -> None:
    write_parquet(tmp_path / "src/a.parquet", pa.table({"text": ["x"], "id": ["1"]}))
    write_parquet(tmp_path / "src/b.parquet", pa.table({"text": pa.array([], pa.string()), "id": pa.array([], pa.string())}))
    with pytest.raises(StageError, match=r"b\.parquet: empty shard"):
        run_download(config(artifact_root, str(tmp_path / "src/*.parquet")))
    assert no_manifest_under(artifact_root)


def test_zero_byte_and_non_parquet_files(tmp_path: Path, artifact_root: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.parquet").write_bytes(b"")
    with pytest.raises(StageError, match=r"a\.parquet: zero-byte file"):
        run_download(config(artifact_root, str(tmp_path / "src/*.parquet")))
    (tmp_path / "src/a.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(StageError, match=r"a\.parquet: not a parquet file or truncated"):
        run_download(config(artifact_root, str(tmp_path / "src/*.parquet")))
    assert no_manifest_under(artifact_root)


def test_non_utf8_text_names_the_row(tmp_path: Path, artifact_root: Path) -> None:
    texts = pa.array([b"fine", b"also fine", b"bad \xff\xfe bytes"], pa.binary())
    write_parquet(tmp_path / "src/a.parquet", pa.table({"text": texts, "id": ["1", "2", "3"]}))
    with pytest.raises(StageError, match=r"a\.parquet: row 2: text is not valid UTF-8"):
        run_download(config(artifact_root, str(tmp_path / "src/*.parquet")))


def test_missing_id_column_is_added(tmp_path: Path, artifact_root: Path) -> None:
    write_parquet(tmp_path / "src/sub/a.parquet", pa.table({"text": ["one", "two", "three"]}), row_group_size=2)
    res = run_download(config(artifact_root, str(tmp_path / "src/**/*.parquet")))
    out = pq.read_table(Path(res.uri) / "data/sub__a.parquet")
    assert out.column("id").to_pylist() == ["sub__a.parquet:0", "sub__a.parquet:1", "sub__a.parquet:2"]
    assert out.column("text").to_pylist() == ["one", "two", "three"]


def test_non_parquet_file_in_the_glob(hub: HubServer, artifact_root: Path) -> None:
    with pytest.raises(StageError, match=r"README\.md: not a \.parquet file"):
        run_download(config(artifact_root, hub.source("*"), **{"download.max_files": 1}))


def test_no_matching_files(tmp_path: Path, artifact_root: Path) -> None:
    with pytest.raises(StageError, match="no parquet files match"):
        run_download(config(artifact_root, str(tmp_path / "nothing/*.parquet")))


def test_glob_semantics() -> None:
    rx = glob_regex("sample/*/0?_*.parquet")
    assert rx.match("sample/10BT/01_a.parquet") and not rx.match("sample/10BT/x/01_a.parquet")
    assert glob_regex("**/*.parquet").match("a.parquet") and glob_regex("**/*.parquet").match("a/b/c.parquet")
    assert glob_regex("[!x]*.json").match("a.json") and not glob_regex("[!x]*.json").match("x.json")


# --------------------------------------------------------------------------- CLI


def test_kiln_download_cli_against_the_hub(hub: HubServer, artifact_root: Path, capsys) -> None:
    from llm.cli.main import main

    rc = main(["download", "--output", str(artifact_root), "--quiet", "--set", f"download.source={hub.source('*.parquet')}",
               "--set", "download.max_files=1", "--set", "download.max_rows=100"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "download" in out and "computed" in out and "rows=100" in out
    assert len(list(artifact_root.glob(f"download/*/{MANIFEST}"))) == 1


def test_kiln_download_cli_reports_bad_input(tmp_path: Path, artifact_root: Path, capsys) -> None:
    from llm.cli.main import main

    write_parquet(tmp_path / "src/a.parquet", pa.table({"body": ["x"]}))
    rc = main(["download", "--output", str(artifact_root), "--quiet", "--set", f"download.source={tmp_path}/src/*.parquet"])
    err = capsys.readouterr().err
    assert rc == 1 and "a.parquet: no 'text' column" in err


def test_an_unresolvable_host_says_how_to_work_offline() -> None:
    # .invalid never resolves (RFC 2606): the offline first run, without the network.
    with pytest.raises(DownloadError, match=r"does not resolve.*KILN_DATA_MIRROR"):
        list_files("hf://datasets/o/r@main/*.parquet", hf_endpoint="http://no-such-host.invalid",
                   retries=1, backoff_s=0.01, timeout_s=TIMEOUT_S)
