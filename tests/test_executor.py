"""The data stages' executors (llm/data/executor.py): the same bytes on every executor and worker
count, a unit retried when its Dask worker dies, an unreachable scheduler refused before any work,
and a rerun after a crash that redoes only the unfinished units.

One real 2-process Dask LocalCluster on 127.0.0.1 serves the whole module (no mocks).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from random import Random

import cloudpickle
import pyarrow.parquet as pq
import pytest

from llm.config import load_config
from llm.data.executor import DaskExecutor, ExecutorError, Unit, make_executor, run_units
from llm.stages.registry import execute
from llm.storage import atomic_path
from tests._dedup_helpers import colliding_low_pair, perturb
from tests._tok_helpers import publish_docs, real_docs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """A real 2-worker Dask cluster (separate processes) on 127.0.0.1; its scheduler address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """Three small files of real documents and a tokenizer trained on them. Planted across files, so
    dedup removes some and its verification has work: two exact copies, a near copy (J >= 0.9) and a
    J~0.4 copy that shares a band with its source (a candidate that verification rejects)."""
    root = tmp_path_factory.mktemp("inputs")
    docs = real_docs(shared_data, 90, shard=1)
    for d in docs:
        d["text"] = d["text"][:2500]
    low_src, low_copy, _ = colliding_low_pair([d["text"] for d in docs if len(d["text"].split()) >= 300][:30])
    assert low_src in [d["text"] for d in docs[:30]]  # the copy sits in another file than its source
    near_src = next(d for d in docs[30:60] if len(d["text"].split()) >= 300)
    planted = [dict(docs[40], id="copy-b"), dict(near_src, id="near-copy", text=perturb(near_src["text"], 0.005, Random(3))),
               dict(docs[0], id="low-copy", text=low_copy)]
    files = [docs[:30], docs[30:60] + [dict(docs[3], id="copy-a")], docs[60:] + planted]
    docs_uri = publish_docs(root, files, row_group_size=8)
    cfg = load_config("tiny", {"run.artifact_root": str(root), "tokenizer.vocab_size": 400,
                               "tokenizer.max_train_chars": 100_000})
    tok_uri = execute("tokenizer", cfg, {"docs": docs_uri}, progress=False).uri
    return {"docs": docs_uri, "tokenizer": tok_uri}


def _run(stage: str, root: Path, corpus: dict, executor: str, workers: int):
    inputs = {"docs": corpus["docs"]} | ({"tokenizer": corpus["tokenizer"]} if stage == "tokenize" else {})
    cfg = load_config("tiny", {"run.artifact_root": str(root), "run.executor": executor, f"{stage}.workers": workers,
                               "tokenize.batch_docs": 16, "tokenize.shard_tokens": 20_000})
    return execute(stage, cfg, inputs, progress=False)


@pytest.mark.parametrize("stage", ["filter", "dedup", "tokenize"])
def test_output_is_the_same_on_every_executor_and_worker_count(stage, tmp_path, corpus, cluster):
    runs = {(ex, w): _run(stage, tmp_path / f"{ex.split(':')[0]}-{w}", corpus, ex, w)
            for ex, w in (("local", 1), ("local", 2), (cluster, 2))}
    keys = {Path(r.uri).name for r in runs.values()}
    files = [r.manifest["files"] for r in runs.values()]
    assert len(keys) == 1, keys  # the content key does not depend on the executor
    assert files[0] and all(f == files[0] for f in files)  # the same files, byte for byte (sha256)
    assert all(r.manifest["counts"] == runs[("local", 1)].manifest["counts"] for r in runs.values())
    if stage == "dedup":  # with verification on (the default): the low copy is a rejected candidate
        counts = runs[("local", 1)].manifest["counts"]
        assert counts["exact_dups"] == 2 and counts["near_dups"] >= 1 and counts["candidate_pairs_rejected"] >= 1
        kept = set(pq.read_table(Path(runs[("local", 1)].uri) / "data", columns=["id"]).column("id").to_pylist())
        assert "low-copy" in kept and "near-copy" not in kept
    for r in runs.values():  # nothing of the units' bookkeeping is published
        assert not [p for p in Path(r.uri).rglob("*") if p.name.startswith(".")]


def test_dask_executor_without_address_starts_and_stops_a_local_cluster():
    ex = make_executor("dask", 2)
    try:
        assert isinstance(ex, DaskExecutor) and ex.workers == 2
        assert ex.client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert ex.map(abs, [-3, 2, -1], desc="abs", progress=False) == [3, 2, 1]
    finally:
        ex.close()
    assert ex.client.status == "closed"


# --------------------------------------------------------------------------- a worker dies mid-unit


def _write_or_die(arg: tuple[str, str, int]) -> int:
    """Write ``dest`` through atomic_path; the first attempt of the chosen unit SIGKILLs its own worker
    halfway through the write (the marker file makes it happen once)."""
    dest, marker, n = arg
    with atomic_path(dest) as tmp:
        with open(tmp, "w") as f:
            f.write("x" * n)
            f.flush()
            if n == 2 and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            f.write("y" * n)
    return n


def test_a_worker_killed_mid_unit_is_retried_and_nothing_is_half_published(tmp_path, cluster):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    marker = tmp_path / "killed-once"
    units = [Unit(f"u{n}", (str(tmp_path / "out" / f"{n}.txt"), str(marker), n), (str(tmp_path / "out" / f"{n}.txt"),))
             for n in (1, 2, 3)]
    ex = make_executor(cluster, 2)
    try:
        assert run_units(ex, _write_or_die, units, tmp_path / "parts", desc="die") == [1, 2, 3]
    finally:
        ex.close()
    assert marker.exists()  # a worker really was killed mid-unit
    for n in (1, 2, 3):  # every file is whole, the killed attempt's half is nowhere to be seen
        assert (tmp_path / "out" / f"{n}.txt").read_text() == "x" * n + "y" * n
        assert json.loads((tmp_path / "parts" / f"u{n}.json").read_text())["result"] == n
    visible = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert visible == ["1.txt", "2.txt", "3.txt"]


# --------------------------------------------------------------------------- an unreachable scheduler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["dedup", "run"])
def test_unreachable_scheduler_is_one_line_naming_it_before_any_work(command, tmp_path, corpus, capsys):
    """``kiln dedup`` (given its input) and ``kiln run`` (which would start with download) both stop
    at once: no stage, upstream or not, has a work dir."""
    from llm.cli.main import main

    address = f"dask://127.0.0.1:{_free_port()}"
    args = ["--input", corpus["docs"]] if command == "dedup" else ["--until", "dedup"]
    capsys.readouterr()
    assert main([command, "--quiet", *args, "--output", str(tmp_path / "art"), "--executor", address]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "unreachable" in lines[0], lines
    assert not (tmp_path / "art").exists()  # nothing started


def test_dask_executor_names_an_unreachable_address_too():
    """The executor itself (a Prefect flow or a library caller skips the CLI's probe) says the same."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ExecutorError, match=f"dask scheduler {address} is unreachable"):
        DaskExecutor(1, address)


def test_a_bad_executor_name_is_refused():
    with pytest.raises(ExecutorError, match="executor 'dusk'"):
        make_executor("dusk", 1)
    from llm.config import ConfigError

    with pytest.raises(ConfigError, match="run.executor"):
        load_config("tiny", {"run.executor": "dask://no-port"})


# --------------------------------------------------------------------------- resume after a crash


def test_a_rerun_after_a_crash_redoes_only_the_missing_units(tmp_path, corpus):
    """``kiln filter`` is SIGKILLed once its first shard's part is done; the rerun keeps that part
    (same file, untouched) and filters only the other shards."""
    root = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "llm.cli", "filter", "--quiet", "--input", corpus["docs"], "--output", str(root),
           "--set", "filter.workers=1", "filter.language.enabled=false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = None
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        found = sorted(root.glob("filter/*.partial/.units/filter/*.json"))
        if found:
            proc.kill()
            parts = found[0].parent
            break
        time.sleep(0.005)
    proc.wait()
    assert parts is not None, "the stage finished before a part was seen"
    done_before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert 0 < len(done_before) < 3, done_before  # crashed with some units done and some not
    shard0 = parts.parent.parent / "data" / "part_00000.parquet"
    first_mtime = shard0.stat().st_mtime_ns

    from llm.cli.main import main

    assert main(cmd[3:]) == 0  # the rerun, in this process
    out = next(p for p in (root / "filter").iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    assert (out / "data" / "part_00000.parquet").stat().st_mtime_ns == first_mtime  # not filtered again
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["shards"] == 3 and manifest["counts"]["docs_in"] == 94
