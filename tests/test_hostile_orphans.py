"""A ``kill -9`` of a data stage takes its worker pool with it (issue 13, item 4).

The workers used to live on under PID 1: they finished their shard, renamed it into the dead stage's
``.partial``, and then held their memory forever. Each test runs the real ``kiln`` CLI on a corpus big
enough to keep two workers busy, SIGKILLs it once its workers exist, and checks that no worker
survives 5 s and that nothing is renamed into the ``.partial`` afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.config import load_config
from llm.stages.registry import execute

REPO = Path(__file__).resolve().parents[1]
SHARDS, ROWS = 4, 400

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the name in (...) may hold spaces


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pool_workers(parent: int) -> set[int]:
    """The spawned multiprocessing workers whose parent is ``parent``."""
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return {pid for pid in pids if _ppid(pid) == parent and "spawn_main" in _cmdline(pid)}


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has finished: it holds no memory and writes nothing)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.add(pid)
    return out


def published_names(partial: Path) -> set[str]:
    """Final (renamed) shard files inside a work dir; temp files excluded."""
    return {p.relative_to(partial).as_posix() for p in partial.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp") and not p.name.startswith(".")}


@pytest.fixture()
def docs(tmp_path: Path, shared_data: Path) -> tuple[Path, str]:
    """A download output of SHARDS FineWeb-named shards of ROWS real documents each."""
    src = tmp_path / "raw"
    src.mkdir()
    table = pa.concat_tables(pq.ParquetFile(p).read() for p in sorted((shared_data / "pretrain").glob("*.parquet"))[:2])
    for i in range(SHARDS):
        pq.write_table(table.slice(i * ROWS, ROWS), src / f"{i:03d}_00000.parquet")
    root = tmp_path / "artifacts"
    cfg = load_config("tiny", {"run.artifact_root": str(root), "download.source": f"{src}/*.parquet",
                               "download.max_files": None, "download.max_rows": None})
    return root, execute("download", cfg, {}, progress=False).uri


def kill_once_busy(cmd: list[str], cwd: Path, ready) -> tuple[set[int], float]:
    """Start ``cmd``; once two pool workers exist and ``ready()`` holds, SIGKILL it. Returns (workers, kill time)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers |= pool_workers(proc.pid)
            if len(workers) >= 2 and ready():
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the stage ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert len(workers) >= 2, "no worker pool appeared"
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait()
        return workers, killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_workers_die(workers: set[int], killed_at: float) -> None:
    try:
        while alive(workers) and time.monotonic() - killed_at < 5:
            time.sleep(0.1)
        assert not alive(workers), f"workers {sorted(alive(workers))} outlived their killed parent by 5 s"
    finally:
        for pid in alive(workers):  # leave no orphan behind for the next test, pass or fail
            os.kill(pid, signal.SIGKILL)


def test_sigkill_of_filter_takes_its_workers_and_their_writes_with_it(docs: tuple[Path, str], tmp_path: Path) -> None:
    root, docs_uri = docs
    partial_dir = root / "filter"

    def busy() -> bool:  # a worker has opened its output shard: it is mid-write
        return any(partial_dir.glob("*.partial/data/*.tmp"))

    cmd = [sys.executable, "-m", "llm.cli", "filter", "--preset", "tiny", "--quiet", "--output", str(root),
           "--input", f"docs={docs_uri}", "--set", "filter.workers=2"]
    workers, killed_at = kill_once_busy(cmd, tmp_path, busy)
    (partial,) = partial_dir.glob("*.partial")
    before = published_names(partial)
    assert_workers_die(workers, killed_at)
    time.sleep(max(0.0, killed_at + 8 - time.monotonic()))  # longer than a worker needs for its shard
    assert published_names(partial) == before, "a shard was renamed into the .partial after its stage was killed"
    assert not (root / "filter" / partial.name.removesuffix(".partial")).exists()


def test_sigkill_of_tokenize_takes_its_workers_with_it(docs: tuple[Path, str], tmp_path: Path) -> None:
    root, docs_uri = docs
    cfg = load_config("tiny", {"run.artifact_root": str(root), "tokenizer.vocab_size": 300,
                               "tokenizer.max_train_chars": 200_000})
    tok_uri = execute("tokenizer", cfg, {"docs": docs_uri}, progress=False).uri
    started: list[float] = []

    def busy() -> bool:  # the workers have had a moment to load the tokenizer and take pieces
        started.append(time.monotonic())
        return started[-1] - started[0] > 1.0

    cmd = [sys.executable, "-m", "llm.cli", "tokenize", "--preset", "tiny", "--quiet", "--output", str(root),
           "--input", f"docs={docs_uri}", "--input", f"tokenizer={tok_uri}", "--set", "tokenize.workers=2"]
    workers, killed_at = kill_once_busy(cmd, tmp_path, busy)
    assert_workers_die(workers, killed_at)
    (partial,) = (root / "tokenize").glob("*.partial")
    before = published_names(partial)
    time.sleep(1.0)
    assert published_names(partial) == before
