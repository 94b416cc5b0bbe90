"""A ``kill -9`` of a stage takes its workers with it (issue 13, item 4: workers die with their parent).

The workers used to live on under PID 1: they finished their shard, renamed it into the dead stage's
``.partial``, and then held their memory forever. Each data-stage test runs the real ``kiln`` CLI on a
corpus big enough to keep two workers busy, SIGKILLs it once its workers exist, and checks that no
worker survives 5 s and that nothing is renamed into the ``.partial`` afterwards.

Training runs its ranks under torchrun, in a session of its own (so that a terminal's Ctrl-C reaches
only kiln, which stops the job in order). A SIGKILL or SIGTERM of ``kiln pretrain`` used to leave that
job training on with nobody to publish it; now a SIGKILL takes it down within 5 s, and a SIGTERM first
lets it checkpoint.
"""

from __future__ import annotations

import json
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


# --------------------------------------------------------------------------- training: the torchrun job


# A tiny model that would train for hours: the tests stop it long before.
PRETRAIN = ["--set", "model.seq_len=64", "pretrain.device=cpu", "pretrain.nproc=1", "pretrain.device_batch_size=2",
            "pretrain.total_batch_tokens=128", "pretrain.steps=1000000", "pretrain.eval_every=1000000",
            "pretrain.ckpt_every=1000000", "pretrain.log_every=5", "pretrain.sample_prompts=[]"]


def torchrun_job(parent: int) -> set[int]:
    """The torchrun launcher that ``parent`` started and the trainer ranks under it."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    launchers = {pid for pid in pids if _ppid(pid) == parent and "torch.distributed.run" in _cmdline(pid)}
    return launchers | {pid for pid in pids if _ppid(pid) in launchers and "llm.train.trainer" in _cmdline(pid)}


@pytest.fixture()
def pretrain_cmd(docs: tuple[Path, str], tmp_path: Path) -> tuple[list[str], Path]:
    """A ``kiln pretrain`` command on a real tokenizer and token shards, and its artifact root."""
    root, docs_uri = docs
    cfg = load_config("tiny", {"run.artifact_root": str(root), "tokenizer.vocab_size": 300,
                               "tokenizer.max_train_chars": 200_000, "tokenize.workers": 1})
    tok_uri = execute("tokenizer", cfg, {"docs": docs_uri}, progress=False).uri
    tokens_uri = execute("tokenize", cfg, {"docs": docs_uri, "tokenizer": tok_uri}, progress=False).uri
    cmd = [sys.executable, "-m", "llm.cli", "pretrain", "--preset", "tiny", "--quiet", "--output", str(root),
           "--input", f"tokens={tokens_uri}", "--input", f"tokenizer={tok_uri}", *PRETRAIN]
    return cmd, root


def start_training(cmd: list[str], cwd: Path, root: Path) -> tuple[subprocess.Popen, set[int]]:
    """Start ``cmd``; return it and its torchrun job once the job has logged a training step."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    job: set[int] = set()
    deadline = time.monotonic() + 180
    while not (len(job) >= 2 and any(m.stat().st_size for m in root.glob("pretrain/*.partial/metrics.jsonl"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training did not start: {proc.stdout.read().decode()[-2000:]}")
        job |= torchrun_job(proc.pid)
        time.sleep(0.05)
    return proc, job


def test_sigkill_of_pretrain_takes_its_torchrun_job_with_it(pretrain_cmd: tuple[list[str], Path],
                                                          tmp_path: Path) -> None:
    cmd, root = pretrain_cmd
    proc, job = start_training(cmd, tmp_path, root)
    proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait()
    assert_workers_die(job, killed_at)


def test_sigterm_of_pretrain_checkpoints_then_stops_its_job_and_itself(pretrain_cmd: tuple[list[str], Path],
                                                                       tmp_path: Path) -> None:
    cmd, root = pretrain_cmd
    proc, job = start_training(cmd, tmp_path, root)
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert_workers_die(job, time.monotonic())
    assert proc.returncode == 128 + signal.SIGTERM, out  # stopped as asked, the way a shell reports SIGTERM
    assert "checkpoint (signal)" in out, out
    (partial,) = root.glob("pretrain/*.partial")
    status = json.loads((partial / "status.json").read_text())
    assert status["status"] == "interrupted"
    assert (partial / "checkpoints" / f"step_{status['step']:06d}" / "meta.json").is_file()
