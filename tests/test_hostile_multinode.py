"""Multi-node training, two nodes simulated on one machine: `kiln pretrain` twice, gloo over loopback.

Each "node" is its own `kiln pretrain` process with KILN_NNODES=2, its own KILN_NODE_RANK and its own
cache (as two machines would have). Before, c10d ranked the nodes by join order, so KILN_NODE_RANK=0
need not host global rank 0, and the node without it failed with "training exited with code 0 ... no
summary.json written". Now node 0 hosts rank 0 and publishes; node 1 ends as a follower, exit 0, with
a line saying so, and writes nothing to the root: neither on a root of its own nor on a shared one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.stages.output import verify_output
from llm.storage import Store

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = ["--set", "download.max_files=1", "download.max_rows=300", "tokenizer.vocab_size=512", "tokenize.workers=1",
            "filter.workers=1", "dedup.workers=1", "--quiet"]
# ~0.5M parameters, 4 steps of 256 tokens over 2 nodes x 1 process.
TRAIN = ["--set", "model.seq_len=64", "pretrain.device_batch_size=2", "pretrain.total_batch_tokens=256",
         "pretrain.steps=4", "pretrain.eval_every=4", "pretrain.eval_tokens=256", "pretrain.log_every=2",
         "pretrain.ckpt_every=4", "pretrain.sample_prompts=[]", "--quiet"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--input`` arguments naming a real tokenizer and token shards (the chain up to tokenize)."""
    root = tmp_path_factory.mktemp("upstream") / "artifacts"
    subprocess.run([sys.executable, "-m", "llm.cli", "tokenize", "--output", str(root), *UPSTREAM], env=_env(),
                   check=True, capture_output=True, timeout=300)
    (tokens,) = [p for p in (root / "tokenize").iterdir() if p.is_dir()]
    (tokenizer,) = [p for p in (root / "tokenizer").iterdir() if p.is_dir()]
    return ["--input", f"tokens={tokens}", "--input", f"tokenizer={tokenizer}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(upstream: list[str], roots: tuple[Path, Path], tmp: Path, train: list[str] = TRAIN,
                 ) -> dict[int, subprocess.Popen]:
    """Start `kiln pretrain` as node 1 and node 0 (in that order: the start order must not matter)."""
    port = _free_port()
    procs = {}
    for rank in (1, 0):
        env = _env(KILN_NNODES="2", KILN_NODE_RANK=str(rank), KILN_RDZV_ENDPOINT=f"127.0.0.1:{port}",
                   KILN_RDZV_ID=f"test-{port}", KILN_CACHE=str(tmp / f"cache-node{rank}"))
        procs[rank] = subprocess.Popen([sys.executable, "-m", "llm.cli", "pretrain", *upstream, "--output",
                                        str(roots[rank]), *train], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    return procs


def _collect(procs: dict[int, subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, output) of node 0 and node 1."""
    results = []
    for rank in (0, 1):
        try:
            out, _ = procs[rank].communicate(timeout=240)
        except subprocess.TimeoutExpired:
            # Ctrl-C, not SIGKILL: kiln then stops its torchrun job (in a session of its own) on the way out.
            for p in procs.values():
                p.send_signal(signal.SIGINT)
            for p in procs.values():
                try:
                    p.communicate(timeout=90)
                except subprocess.TimeoutExpired:
                    p.kill()
            raise
        results.append((procs[rank].returncode, out))
    return results


def _two_nodes(upstream: list[str], roots: tuple[Path, Path], tmp: Path) -> list[tuple[int, str]]:
    return _collect(_start_nodes(upstream, roots, tmp))


def _published(root: Path) -> list[Path]:
    return [p for p in (root / "pretrain").glob("*") if verify_output(Store(str(root)), str(p), deep=True)]


def _follower_line_and_no_scratch(out: str, cache: Path) -> None:
    assert "node 1 of 2 is a follower" in out and "this node publishes nothing" in out, out
    assert "follower" in [line.split()[1] for line in out.splitlines() if line.startswith("pretrain ")], out
    assert not list((cache / "follower").glob("*")), "the follower's scratch dir was left behind"


def test_separate_roots_node_0_publishes_and_node_1_follows(upstream: list[str], tmp_path: Path) -> None:
    roots = (tmp_path / "node0-root", tmp_path / "node1-root")
    (rc0, out0), (rc1, out1) = _two_nodes(upstream, roots, tmp_path)
    assert rc0 == 0, out0
    assert rc1 == 0, out1
    (published,) = _published(roots[0])
    assert "computed" in out0 and published.name in out0
    m = verify_output(Store(str(roots[0])), str(published))
    assert m["counts"]["steps"] == 4 and m["world_size"] == 2
    _follower_line_and_no_scratch(out1, tmp_path / "cache-node1")
    # The follower's root holds no pretrain output and no .partial: it wrote nothing there.
    assert not list(roots[1].glob("pretrain/*")), list(roots[1].rglob("*"))


def test_shared_root_one_output_and_no_error(upstream: list[str], tmp_path: Path) -> None:
    shared = tmp_path / "shared-root"
    (rc0, out0), (rc1, out1) = _two_nodes(upstream, (shared, shared), tmp_path)
    assert rc0 == 0, out0
    assert rc1 == 0, out1
    (published,) = _published(shared)
    assert sorted(p.name for p in (shared / "pretrain").iterdir()) == [published.name]  # no .partial, no lock
    _follower_line_and_no_scratch(out1, tmp_path / "cache-node1")
    ls = subprocess.run([sys.executable, "-m", "llm.cli", "ls", "--root", str(shared), "--stage", "pretrain",
                         "--verify"], env=_env(), capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and "1 outputs" in ls.stdout and "1 ok, 0 unfinished" in ls.stdout, ls.stdout + ls.stderr


def test_an_interrupted_job_on_a_shared_root_resumes_on_both_nodes(upstream: list[str], tmp_path: Path) -> None:
    """The follower's scratch has no checkpoint: it must resume from rank 0's, in the leader's .partial,
    or its ranks would start at step 0 while rank 0 resumes (a hang, or a wrong model)."""
    shared = tmp_path / "shared-root"
    train = [a.replace("pretrain.steps=4", "pretrain.steps=160").replace("pretrain.ckpt_every=4", "pretrain.ckpt_every=20")
             .replace("pretrain.eval_every=4", "pretrain.eval_every=1000") for a in TRAIN]
    procs = _start_nodes(upstream, (shared, shared), tmp_path, train)
    deadline = time.monotonic() + 180
    while not list(shared.glob("pretrain/*.partial/checkpoints/step_0000[4-9]0")):  # a checkpoint, mid-run
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values())
        time.sleep(0.05)
    for p in procs.values():
        p.send_signal(signal.SIGINT)  # Ctrl-C: the trainer checkpoints and stops
    _collect(procs)
    assert not _published(shared)
    (rc0, out0), (rc1, out1) = _collect(_start_nodes(upstream, (shared, shared), tmp_path, train))
    assert rc0 == 0 and rc1 == 0, out0 + out1
    assert re.search(r"resumed from \S+\.partial/checkpoints/step_\d+ at step [1-9]", out0), out0
    (published,) = _published(shared)
    assert verify_output(Store(str(shared)), str(published))["counts"]["steps"] == 160
    _follower_line_and_no_scratch(out1, tmp_path / "cache-node1")


def _overrides(args: list[str]) -> dict[str, object]:
    """TRAIN's ``--set`` values as a flow's ``overrides`` dict."""
    import yaml

    pairs = [a.split("=", 1) for a in args if "=" in a]
    return {k: yaml.safe_load(v) for k, v in pairs}


def test_a_follower_under_prefect_completes_its_flow_run(upstream: list[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 1 as the `pretrain` stage flow (what a deployment run on the gpu pool executes), node 0 as the CLI."""
    from prefect.settings import PREFECT_HOME, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.stage_flows import pretrain_flow

    port = _free_port()
    rdzv = {"KILN_NNODES": "2", "KILN_RDZV_ENDPOINT": f"127.0.0.1:{port}", "KILN_RDZV_ID": f"test-{port}"}
    root0, root1 = tmp_path / "node0-root", tmp_path / "node1-root"
    inputs = dict(a.split("=", 1) for a in upstream if a != "--input")
    for k, v in {**rdzv, "KILN_NODE_RANK": "1", "KILN_CACHE": str(tmp_path / "cache-node1"),
                 "PREFECT_HOME": str(tmp_path / "prefect-home")}.items():
        monkeypatch.setenv(k, v)
    leader = subprocess.Popen([sys.executable, "-m", "llm.cli", "pretrain", *upstream, "--output", str(root0), *TRAIN],
                              env=_env(**rdzv, KILN_NODE_RANK="0", KILN_CACHE=str(tmp_path / "cache-node0")),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with temporary_settings(updates={PREFECT_HOME: tmp_path / "prefect-home", PREFECT_LOGGING_TO_API_ENABLED: False}):
            with prefect_test_harness(server_startup_timeout=120):
                state = pretrain_flow(overrides={**_overrides(TRAIN), "run.artifact_root": str(root1),
                                                 "orchestration.result_storage": str(tmp_path / "results")},
                                      inputs=inputs, return_state=True)
    finally:
        out0, _ = leader.communicate(timeout=240)
    assert leader.returncode == 0, out0
    assert state.is_completed(), state
    summary = state.result()
    assert "node 1 of 2 is a follower" in summary["follower"] and summary["hash"] is None
    assert len(_published(root0)) == 1 and not list(root1.glob("pretrain/*"))
