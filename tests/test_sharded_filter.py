"""The filter stage as per-shard Prefect tasks on a local 2-worker Dask cluster gives the same output
(same key, same files, same counts) as the registered in-process filter stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest


@pytest.fixture()
def two_small_shards(tmp_path, shared_data) -> Path:
    src = tmp_path / "source"
    src.mkdir()
    for i, shard in enumerate(sorted((shared_data / "pretrain").glob("*.parquet"))[:2]):
        pq.write_table(pq.ParquetFile(shard).read_row_group(0).slice(0, 60), src / f"part_{i}.parquet")
    return src


def test_dask_sharded_filter_matches_the_filter_stage(tmp_path, two_small_shards, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.sharded_filter import filter_sharded, runner
    from llm.config import load_config
    from llm.stages.registry import execute

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))

    def overrides(root: str) -> dict:
        return {"run.artifact_root": root, "download.source": f"{two_small_shards}/*.parquet",
                "download.max_files": None, "filter.workers": 1}

    a, b = load_config("tiny", overrides(str(tmp_path / "a"))), load_config("tiny", overrides(str(tmp_path / "b")))
    docs_a = execute("download", a, {}, progress=False).uri
    docs_b = execute("download", b, {}, progress=False).uri
    with prefect_test_harness(server_startup_timeout=120):
        sharded = filter_sharded.with_options(task_runner=runner(workers=2))(
            overrides=overrides(a.run.artifact_root), inputs={"docs": docs_a})
    plain = execute("filter", b, {"docs": docs_b}, progress=False)

    assert not sharded["reused"]
    assert Path(sharded["uri"]).name == Path(plain.uri).name  # same content key
    ma = json.loads((Path(sharded["uri"]) / "manifest.json").read_text())
    assert ma["counts"]["shards"] == 2 and ma["counts"]["docs_in"] == 120
    assert ma["files"] == plain.manifest["files"]  # byte-identical shard files
    for k in ("counts", "removed_by_rule", "examples_per_rule", "shards"):
        assert ma[k] == plain.manifest[k], k
