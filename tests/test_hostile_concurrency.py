"""Identical stage runs at once, and what a failed stage leaves behind, through the real `kiln` CLI.

Two ``kiln tokenize --force`` on one root used to share one ``<key>.partial`` with no lock: the
loser failed with ``[Errno 2] ... idx.npy`` once the winner renamed the directory away. Now the first
run computes and the second waits for it and reuses the output, on a local relative root and on an
S3 root (a real moto server; the work dir of an S3 root is in the local cache, shared by the two).

The overlap is made certain rather than hoped for: the first run is frozen (SIGSTOP) while it works
in its ``.partial``, the second is started, and the first is resumed once the second is waiting (or
has finished, which is the old failure).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.stages.output import StageError, run_stage, verify_output
from llm.storage import Store
from s3_server import moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]
# A small, real chain: one parquet file, 1000 rows; tokenize takes long enough to be caught working.
SMALL = ["--set", "download.max_files=1", "download.max_rows=1000", "tokenizer.vocab_size=512", "tokenize.workers=1",
         "filter.workers=1", "dedup.workers=1", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _kiln(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`kiln ARGS` in its own process group (so it can be frozen or killed whole), output to ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "llm.cli", *args], cwd=cwd, env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(p: subprocess.Popen, log: Path, timeout: float = 240) -> tuple[int, str]:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return p.returncode, log.read_text()


def _status(out: str) -> str:
    """The status column of the summary's tokenize row: computed or cached."""
    m = re.search(r"^tokenize\s+(\w+)", out, re.M)
    assert m, out
    return m.group(1)


def _uri(out: str) -> str:
    m = re.search(r"^\s+(\S+/tokenize/[0-9a-f]{20})$", out, re.M)
    assert m, out
    return m.group(1)


def _wait_for(cond, timeout: float, what: str, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = cond()
        if found:
            return found
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _frozen_while_working(args: list[str], cwd: Path, partials, log: Path) -> subprocess.Popen:
    """Start a forced run and SIGSTOP it while it works in its ``.partial`` (retrying if it was too quick)."""
    for _ in range(4):
        p = _kiln(args, cwd, log)
        found = _wait_for(lambda: list(partials()) or p.poll() is not None, 120, "the run's .partial")
        if found is not True:
            os.killpg(p.pid, signal.SIGSTOP)
            if list(partials()):
                return p
            os.killpg(p.pid, signal.SIGCONT)
        _finish(p, log)
    raise AssertionError("could not catch the first run inside its .partial")


def _two_at_once(args: list[str], cwd: Path, partials, tmp: Path) -> tuple[list[int], list[str]]:
    a_log, b_log = tmp / "a.log", tmp / "b.log"
    a = _frozen_while_working(args, cwd, partials, a_log)
    b = _kiln(args, cwd, b_log)
    try:  # until B waits for A (fixed) or B is done (it computed in A's .partial: the old collision)
        _wait_for(lambda: "waiting" in b_log.read_text() or b.poll() is not None, 180, "the second run", poll=0.1)
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    (ra, oa), (rb, ob) = _finish(a, a_log), _finish(b, b_log)
    return [ra, rb], [oa, ob]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A directory whose ./artifacts holds the SMALL chain up to tokenize, and the tokenize output's URI."""
    where = tmp_path_factory.mktemp("prepared")
    rc, out = _finish(_kiln(["tokenize", *SMALL], where, where / "prep.log"), where / "prep.log")
    assert rc == 0, out
    return where / "artifacts", _uri(out)


def _copy_of(prepared: tuple[Path, str], cwd: Path) -> str:
    """``prepared``'s ./artifacts copied under ``cwd`` (every test gets its own root)."""
    shutil.copytree(prepared[0], cwd / "artifacts")
    return prepared[1]


def test_two_forced_runs_on_a_local_relative_root_compute_once(tmp_path: Path, prepared) -> None:
    _copy_of(prepared, tmp_path)
    root = tmp_path / "artifacts"  # the default root, ./artifacts, relative to the cwd
    codes, outs = _two_at_once(["tokenize", "--force", *SMALL], tmp_path, lambda: root.glob("tokenize/*.partial"),
                               tmp_path)
    assert codes == [0, 0], outs
    assert sorted(_status(o) for o in outs) == ["cached", "computed"], outs
    assert "being computed by" in outs[1] and "waiting for it" in outs[1]
    uri = _uri(outs[0])
    assert _uri(outs[1]) == uri
    m = verify_output(Store("./artifacts"), str(tmp_path / uri), deep=True)
    assert m is not None and m["counts"]["tokens"] > 0
    assert not list(root.glob("tokenize/*.partial"))
    rc, out = _finish(_kiln(["ls", "--root", "artifacts", "--verify"], tmp_path, tmp_path / "ls.log"), tmp_path / "ls.log")
    assert rc == 0 and "0 unfinished, 0 damaged" in out, out


def test_two_forced_runs_on_an_s3_root_compute_once(tmp_path: Path, s3_bucket) -> None:  # noqa: F811
    root = f"{s3_bucket.uri}/root"
    args = ["tokenize", "--output", root, *SMALL]
    rc, out = _finish(_kiln(args, tmp_path, tmp_path / "prep.log"), tmp_path / "prep.log")
    assert rc == 0, out
    # Both processes share this machine's cache, where an S3 root's work dirs live.
    work = Path(os.environ["KILN_CACHE"]) / "work"
    codes, outs = _two_at_once(["tokenize", "--force", "--output", root, *SMALL], tmp_path,
                               lambda: work.glob("*/tokenize/*.partial"), tmp_path)
    assert codes == [0, 0], outs
    assert sorted(_status(o) for o in outs) == ["cached", "computed"], outs
    uri = _uri(outs[0])
    assert uri.startswith(root) and _uri(outs[1]) == uri
    m = verify_output(Store(root), uri)
    assert m is not None and m["counts"]["tokens"] > 0
    rc, out = _finish(_kiln(["ls", "--root", root, "--verify"], tmp_path, tmp_path / "ls.log"), tmp_path / "ls.log")
    assert rc == 0 and "0 unfinished, 0 damaged" in out, out


def test_a_lock_left_by_a_killed_run_or_a_vanished_machine_is_taken_over(tmp_path: Path, prepared) -> None:
    uri = tmp_path / _copy_of(prepared, tmp_path)
    root = tmp_path / "artifacts"
    # 1. kill -9 in the middle of the stage: its lock stays, naming a pid that is gone.
    a = _frozen_while_working(["tokenize", "--force", *SMALL], tmp_path, lambda: root.glob("tokenize/*.partial"),
                              tmp_path / "a.log")
    ls = subprocess.run([sys.executable, "-m", "llm.cli", "ls", "--root", "artifacts", "--stage", "tokenize"],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert f"running: pid {a.pid} on" in ls.stdout, ls.stdout + ls.stderr  # kiln ls tells running from crashed
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    ls = subprocess.run([sys.executable, "-m", "llm.cli", "ls", "--root", "artifacts", "--stage", "tokenize"],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert "unfinished: crashed or failed" in ls.stdout, ls.stdout + ls.stderr
    t0 = time.monotonic()
    rc, out = _finish(_kiln(["tokenize", "--force", *SMALL], tmp_path, tmp_path / "b.log"), tmp_path / "b.log", 120)
    assert rc == 0 and _status(out) == "computed", out
    assert time.monotonic() - t0 < 60  # no lease to sit out: the holder was on this machine and is dead
    assert verify_output(Store(str(root)), str(uri), deep=True) is not None

    # 2. a lock from another machine that stopped refreshing it an hour ago (longer than the lease).
    lock = uri.with_name(uri.name + ".lock")
    lock.write_text(json.dumps({"token": "gone", "host": "elsewhere", "host_id": "elsewhere/boot/1", "pid": 1,
                                "since": time.time() - 3600}))
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    rc, out = _finish(_kiln(["tokenize", "--force", *SMALL], tmp_path, tmp_path / "c.log"), tmp_path / "c.log", 120)
    assert rc == 0 and _status(out) == "computed" and "stale" in out, out
    assert not lock.exists() and verify_output(Store(str(root)), str(uri), deep=True) is not None


# --------------------------------------------------------------------------- what a failed stage leaves


def test_a_stage_that_fails_on_its_config_leaves_no_empty_partial(tmp_path: Path, prepared) -> None:
    """A batch plan that does not divide is refused (by config validation, before the stage starts) and
    leaves nothing behind."""
    _copy_of(prepared, tmp_path)
    rc, out = _finish(_kiln(["pretrain", *SMALL, "--set", "pretrain.total_batch_tokens=1000"], tmp_path,
                            tmp_path / "a.log"), tmp_path / "a.log")
    assert rc != 0 and "total_batch_tokens: 1000" in out, out
    assert not list((tmp_path / "artifacts").glob("*/*.partial")), list((tmp_path / "artifacts").rglob("*"))


def test_a_stage_that_fails_before_writing_leaves_no_empty_partial(artifact_root: Path) -> None:
    """Config checks that only the stage itself can make (it raises before writing a file) leave no
    empty ``.partial`` for ``kiln ls`` to puzzle over."""
    def refuse(out, inputs):
        raise StageError("pretrain: bad setting")

    with pytest.raises(StageError, match="bad setting"):
        run_stage(Store(str(artifact_root)), "s", {"a": 1}, {}, "1", refuse)
    assert not list(artifact_root.glob("*/*.partial"))


def test_a_failed_stage_keeps_a_partial_it_wrote_to(artifact_root: Path) -> None:
    """Training resumes from what a crashed run left, so a work dir with files in it stays."""
    store = Store(str(artifact_root))

    def writes_then_fails(out, _inputs):
        out.path("checkpoints/step_000010/meta.json").write_text("{}")
        raise StageError("demo: failed after a checkpoint")

    with pytest.raises(StageError, match="after a checkpoint"):
        run_stage(store, "demo", {"x": 1}, {}, "1", writes_then_fails)
    kept = list(artifact_root.glob("demo/*.partial"))
    assert len(kept) == 1 and (kept[0] / "checkpoints/step_000010/meta.json").is_file()


def test_ls_shows_every_partial_it_finds_empty_or_not(tmp_path: Path, s3_bucket) -> None:  # noqa: F811
    root = tmp_path / "artifacts"
    (root / "pretrain" / "0123456789abcdef0123.partial").mkdir(parents=True)  # left by an older kiln, say
    rc, out = _finish(_kiln(["ls", "--root", str(root)], tmp_path, tmp_path / "ls.log"), tmp_path / "ls.log")
    assert rc == 0 and "0123456789abcdef0123" in out and "1 unfinished" in out, out

    # An S3 root's work dirs are in this machine's cache, not under the root: shown all the same.
    s3_root = f"{s3_bucket.uri}/root"
    Store(s3_root).put_bytes(b"x", f"{s3_root}/download/aaaaaaaaaaaaaaaaaaaa/part.parquet")  # something there
    work = Path(os.environ["KILN_CACHE"]) / "work" / f"{s3_bucket.name}_root" / "tokenize" / "bbbbbbbbbbbbbbbbbbbb.partial"
    (work / "train").mkdir(parents=True)
    (work / "train" / "shard_00000.bin").write_bytes(b"\0" * 10)
    rc, out = _finish(_kiln(["ls", "--root", s3_root], tmp_path, tmp_path / "ls3.log"), tmp_path / "ls3.log")
    assert "bbbbbbbbbbbbbbbbbbbb" in out and "on this machine" in out, out
