"""The artifact store and content-addressed stage outputs, on a local root and on a real S3 API
(moto_server on loopback, spoken to over HTTP by boto3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from s3_server import FaultProxy, S3Bucket, moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

from llm.stages.output import MANIFEST, StageError, run_stage, verify_output
from llm.storage import Store, sha256_file

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return Store(f"s3://{bucket.name}/root")


def test_put_get_exists_list_delete(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    assert not store.exists(store.uri("a/one.bin"))
    store.put(src, store.uri("a/one.bin"))
    store.put_bytes(b"hello", store.uri("a/b/two.txt"))
    store.put_bytes(b"other", store.uri("c/three.txt"))

    assert store.exists(store.uri("a/one.bin"))
    assert store.get_bytes(store.uri("a/b/two.txt")) == b"hello"
    got = store.get(store.uri("a/one.bin"), tmp_path / "out" / "one.bin")
    assert got.read_bytes() == src.read_bytes()
    assert store.list(store.uri("a")) == [store.uri("a/b/two.txt"), store.uri("a/one.bin")]
    assert store.list_sizes(store.uri("a")) == {store.uri("a/b/two.txt"): 5, store.uri("a/one.bin"): 3000}
    assert dict(store.iter_files(store.uri("a"))) == {"b/two.txt": store.uri("a/b/two.txt"), "one.bin": store.uri("a/one.bin")}
    # a prefix is a directory, not a string prefix: "a" does not list "ab/..."
    store.put_bytes(b"x", store.uri("ab/four.txt"))
    assert len(store.list(store.uri("a"))) == 2

    # cache_path gives a readable local file for either backend
    assert store.cache_path(store.uri("c/three.txt")).read_bytes() == b"other"

    store.delete_prefix(store.uri("a"))
    assert store.list(store.uri("a")) == []
    assert not store.exists(store.uri("a/one.bin"))
    assert store.exists(store.uri("c/three.txt"))


def test_missing_object_is_file_not_found(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.get_bytes(store.uri("nope.txt"))
    assert store.list(store.uri("nothing-here")) == []


def test_put_overwrites_atomically(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "v.txt"
    for version in (b"first", b"second"):
        src.write_bytes(version)
        store.put(src, store.uri("v.txt"))
    assert store.get_bytes(store.uri("v.txt")) == b"second"
    if not store.root.startswith("s3://"):  # no temp files left next to the artifact
        assert sorted(p.name for p in Path(store.root).iterdir()) == ["v.txt"]


def test_multipart_upload_of_a_large_file(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    # S3 needs parts >= 5 MiB; a 5 MiB threshold keeps the test at 11 MiB and three parts.
    store = Store(f"s3://{s3_bucket.name}/big", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB))
    store.put(src, store.uri("big.bin"))
    head = s3_bucket.client().head_object(Bucket=s3_bucket.name, Key="big/big.bin")
    assert head["ContentLength"] == 11 * MiB
    assert head["ETag"].strip('"').endswith("-3"), "expected a 3-part multipart ETag"
    back = store.get(store.uri("big.bin"), tmp_path / "back.bin")
    assert sha256_file(back) == sha256_file(src)


def test_transient_errors_are_retried(s3_bucket: S3Bucket) -> None:
    Store(f"s3://{s3_bucket.name}").put_bytes(b"payload", f"s3://{s3_bucket.name}/k.txt")
    with FaultProxy(s3_bucket.endpoint) as proxy:
        store = Store(f"s3://{s3_bucket.name}", endpoint_url=proxy.url)
        proxy.add_fault(500, method="GET", match="*/k.txt", times=1)
        assert store.get_bytes(f"s3://{s3_bucket.name}/k.txt") == b"payload"
        assert proxy.count("GET", "*/k.txt") == 2  # one 500, then the real answer

        proxy.add_fault(503, method="PUT", match="*/new.txt", times=2)
        store.put_bytes(b"new", f"s3://{s3_bucket.name}/new.txt")
        assert proxy.count("PUT", "*/new.txt") == 3
        assert store.get_bytes(f"s3://{s3_bucket.name}/new.txt") == b"new"


def test_deterministic_errors_raise_at_once(s3_bucket: S3Bucket) -> None:
    Store(f"s3://{s3_bucket.name}").put_bytes(b"payload", f"s3://{s3_bucket.name}/k.txt")
    with FaultProxy(s3_bucket.endpoint) as proxy:
        store = Store(f"s3://{s3_bucket.name}", endpoint_url=proxy.url)
        proxy.add_fault(403, method="GET", match="*/k.txt", times=None)
        with pytest.raises(ClientError) as e:
            store.get_bytes(f"s3://{s3_bucket.name}/k.txt")
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert proxy.count("GET", "*/k.txt") == 1  # no retry on access denied

        # an error code botocore does not model is still not mistaken for "not found"
        proxy.add_fault(403, method="GET", match="*/k2.txt", times=None, code="Forbidden")
        with pytest.raises(ClientError) as e:
            store.get_bytes(f"s3://{s3_bucket.name}/k2.txt")
        assert not isinstance(e.value, FileNotFoundError) and proxy.count("GET", "*/k2.txt") == 1

        # a real 404 from the server: FileNotFoundError after one request
        with pytest.raises(FileNotFoundError):
            store.get_bytes(f"s3://{s3_bucket.name}/missing.txt")
        assert proxy.count("GET", "*/missing.txt") == 1


def _stage_fn(calls: list[int], payload: bytes = b"shard"):
    def fn(out, inputs):
        calls.append(1)
        out.path("data/part-0.bin").write_bytes(payload)
        out.path("meta.json").write_text(json.dumps({"inputs": sorted(inputs)}))
        return {"counts": {"parts": 1}}
    return fn


def test_run_stage_on_s3_publishes_verifies_and_caches(s3_bucket: S3Bucket) -> None:
    store = Store(f"s3://{s3_bucket.name}/artifacts")
    calls: list[int] = []
    first = run_stage(store, "download", {"x": 1}, {}, "1", _stage_fn(calls))
    assert not first.cached and first.uri.startswith(f"s3://{s3_bucket.name}/artifacts/download/")
    assert set(first.manifest["files"]) == {"data/part-0.bin", "meta.json"}
    assert first.manifest["counts"] == {"parts": 1}
    rel = {r: u for r, u in store.iter_files(first.uri)}
    assert set(rel) == {"data/part-0.bin", "meta.json", MANIFEST}
    assert store.get_bytes(rel["data/part-0.bin"]) == b"shard"
    assert verify_output(store, first.uri) is not None

    again = run_stage(store, "download", {"x": 1}, {}, "1", _stage_fn(calls))
    assert again.cached and again.uri == first.uri and len(calls) == 1

    # a downstream stage keyed on the upstream manifest, reading the upstream through the store
    down = run_stage(store, "filter", {"y": 2}, {"docs": first.uri}, "1", _stage_fn(calls, b"filtered"))
    assert not down.cached and down.manifest["inputs"]["docs"]["hash"] == first.manifest["hash"]

    # a different config is a different key, computed again
    other = run_stage(store, "download", {"x": 2}, {}, "1", _stage_fn(calls))
    assert other.uri != first.uri and not other.cached and len(calls) == 3


def test_crashed_stage_on_s3_leaves_nothing_that_looks_done(s3_bucket: S3Bucket) -> None:
    store = Store(f"s3://{s3_bucket.name}/artifacts")

    def crash(out, inputs):
        out.path("data/part-0.bin").write_bytes(b"half")
        raise StageError("bad row 3")

    with pytest.raises(StageError):
        run_stage(store, "download", {"x": 1}, {}, "1", crash)
    assert [u for u in store.list(store.uri("download")) if u.endswith(MANIFEST)] == []
    # a missing file makes a published output unverifiable, so it is recomputed
    calls: list[int] = []
    done = run_stage(store, "download", {"x": 1}, {}, "1", _stage_fn(calls))
    store.delete_prefix(done.uri + "/data")
    assert verify_output(store, done.uri) is None
    redo = run_stage(store, "download", {"x": 1}, {}, "1", _stage_fn(calls))
    assert not redo.cached and len(calls) == 2


def test_unfinished_input_is_refused(s3_bucket: S3Bucket) -> None:
    store = Store(f"s3://{s3_bucket.name}/artifacts")
    with pytest.raises(StageError, match="not a finished stage output"):
        run_stage(store, "filter", {}, {"docs": store.uri("download/nope")}, "1", _stage_fn([]))


def test_run_stage_local_publish_and_cache(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "artifacts"))
    calls: list[int] = []
    first = run_stage(store, "download", {"x": 1}, {}, "1", _stage_fn(calls))
    assert (Path(first.uri) / MANIFEST).is_file() and not Path(first.uri + ".partial").exists()
    assert run_stage(store, "download", {"x": 1}, {}, "1", _stage_fn(calls)).cached
    (Path(first.uri) / "data" / "part-0.bin").write_bytes(b"changed size!")
    assert verify_output(store, first.uri) is None
    assert not run_stage(store, "download", {"x": 1}, {}, "1", _stage_fn(calls)).cached
