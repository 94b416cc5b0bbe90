"""Training stages: launch ``torchrun -m llm.train.trainer`` as a subprocess and turn its result into a manifest.

:func:`launch_training` is the one reusable entry point — pretraining (:func:`run_pretrain`, registry
stage "pretrain") and the chat stages (midtrain/SFT) all call it with their own train config, loader
kind/spec and init checkpoint. It

1. picks the process count (``train.nproc``, or the GPU count, or 1 on CPU) and the rendezvous
   (``--standalone``, or multi-node from ``KILN_NNODES``/``KILN_RDZV_ENDPOINT``: ``llm.torchrun``),
2. checks the batch plan BEFORE launching (an indivisible batch is a :class:`~llm.stages.output.StageError`),
3. writes ``job.json`` into the output dir and runs ``python -m torch.distributed.run --standalone
   --nproc_per_node=N -m llm.train.trainer --job job.json`` in its own process group,
4. streams every output line to stdout (progress bars pass through) or to a sink — a callback argument,
   or one installed with :func:`line_sink` (how a Prefect task routes lines into its run logger without
   ``llm/`` importing Prefect),
5. fails with the exit code and the last lines of output, or returns ``summary.json``; on a multi-node
   follower (``KILN_NODE_RANK`` > 0) it raises :class:`~llm.stages.output.FollowerDone` instead: rank 0, on
   node 0, wrote the summary and that node publishes.

Resume is automatic: the stage work dir (``<key>.partial``) survives a crash, and the trainer resumes
from its newest checkpoint (or from the S3 mirror of it when the artifact root is ``s3://``).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from llm.stages.output import FollowerDone, StageError, StageOutput
from llm.storage import write_atomic

LineSink = Callable[[str], None]
_SINK: contextvars.ContextVar[LineSink | None] = contextvars.ContextVar("kiln_train_line_sink", default=None)
TAIL_LINES = 40


@contextlib.contextmanager
def line_sink(fn: LineSink) -> Iterator[None]:
    """Route training output lines to ``fn`` (e.g. a Prefect run logger's ``info``) inside this block."""
    token = _SINK.set(fn)
    try:
        yield
    finally:
        _SINK.reset(token)


class TrainingFailed(RuntimeError):
    """torchrun exited non-zero (possibly transient: OOM, NCCL, preemption). Carries the exit code and tail."""

    def __init__(self, stage: str, code: int, tail: list[str]):
        self.code, self.tail = code, tail
        super().__init__(f"{stage}: training exited with code {code}; last lines:\n" + "\n".join(tail))


def pick_nproc(train_cfg: Any) -> int:
    """``train.nproc`` when set; else every visible GPU (when the device may be CUDA), else 1."""
    if train_cfg.nproc != "auto":
        return int(train_cfg.nproc)
    if train_cfg.device == "cpu":
        return 1
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(1, n)


def launch_training(
    *,
    stage: str,
    model_config: dict[str, Any],
    train_config: Any,
    loader_kind: str,
    loader_spec: dict[str, Any],
    out_dir: str | Path,
    tokenizer_uri: str | None = None,
    init_checkpoint: str | None = None,
    seed: int = 1337,
    resume: str = "auto",
    upload_uri: str | None = None,
    s3_endpoint: str = "",
    mlflow: dict[str, Any] | None = None,
    progress: bool = True,
    on_line: LineSink | None = None,
    nproc: int | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one training job to completion under torchrun and return its ``summary.json``.

    ``model_config``: ``GPTConfig.to_dict()``. ``train_config``: a ``TrainConfig`` (or subclass) instance.
    ``loader_kind``/``loader_spec``: see ``llm.train.loaders``. ``out_dir``: local dir for checkpoints/, final/,
    metrics.jsonl, samples.json, summary.json (resumed from when it has checkpoints and ``resume="auto"``).
    ``init_checkpoint``: weights to start from when not resuming. ``upload_uri``: mirror checkpoints there.
    ``mlflow``: {"enabled", "tracking_uri", "experiment", "run_name"}. Raises StageError for a bad batch
    plan, :class:`TrainingFailed` for a non-zero exit, RuntimeError when the job stopped early (signal).
    """
    from llm.model import GPTConfig
    from llm.train.plan import BatchPlanError, plan_batch

    from llm.torchrun import multi_node, rendezvous_args

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = nproc or pick_nproc(train_config)
    mc = GPTConfig.from_dict(model_config)
    child_env = dict(os.environ)
    if s3_endpoint:  # the job reads shards/tokenizer/checkpoints from s3:// through boto3's env chain
        child_env.setdefault("AWS_ENDPOINT_URL", s3_endpoint)
    child_env.update({k: str(v) for k, v in train_config.nccl_env.items()})
    child_env.update(env or {})
    rdzv = rendezvous_args(child_env)  # --standalone, or multi-node args from KILN_NNODES etc.
    nodes = multi_node(child_env)
    try:
        plan_batch(train_config.total_batch_tokens, train_config.device_batch_size, mc.seq_len,
                   n * (nodes.nnodes if nodes else 1))
    except BatchPlanError as e:
        raise StageError(f"{stage}: {e}") from None
    job = {
        "stage": stage, "model": mc.to_dict(), "train": train_config.model_dump(mode="json"),
        "loader": {"kind": loader_kind, "spec": loader_spec}, "tokenizer": tokenizer_uri,
        "init_checkpoint": init_checkpoint, "out_dir": str(out_dir.resolve()), "resume": resume,
        "upload_uri": upload_uri, "s3_endpoint": s3_endpoint, "seed": seed,
        "mlflow": mlflow or {"enabled": False}, "progress": progress,
    }
    job_path = out_dir / "job.json"
    write_atomic(job_path, json.dumps(job, indent=2))

    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={n}",
           "-m", "llm.train.trainer", "--job", str(job_path)]
    child_env["PYTHONUNBUFFERED"] = "1"
    repo = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = repo + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    sink = on_line or _SINK.get()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    emit = _emitter(sink, progress, tail)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                            start_new_session=True)
    try:
        _pump(proc, emit)
        code = proc.wait()
    except BaseException:
        # We are being interrupted: ask the job to checkpoint and stop (torchrun forwards SIGTERM).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            proc.wait(timeout=120)
        raise
    if code != 0:
        if code == 2 and any("batch plan error" in t for t in tail):
            raise StageError(f"{stage}: " + next(t for t in tail if "batch plan error" in t))
        raise TrainingFailed(stage, code, list(tail))
    if nodes is not None and not nodes.leader:
        # Global rank 0, the only rank that writes checkpoints and summary.json, runs on node 0.
        raise FollowerDone(f"{stage}: node {nodes.rank} of {nodes.nnodes} is a follower: training finished on every "
                           f"node; node 0 publishes the output, this node publishes nothing")
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise TrainingFailed(stage, code, list(tail) + ["(no summary.json written)"])
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "done":
        raise RuntimeError(f"{stage}: training stopped at step {summary.get('steps')} of {summary.get('planned_steps')} "
                           f"({summary.get('status')}); its checkpoint is in {out_dir}, run again to resume")
    return summary


def _emitter(sink: LineSink | None, progress: bool, tail: collections.deque[str]) -> Callable[[str, bool], None]:
    bar_shown = False
    tty = sys.stdout.isatty()

    def emit(text: str, is_bar: bool) -> None:
        nonlocal bar_shown
        if not text.strip():
            return
        if is_bar:  # a carriage-return progress-bar redraw
            if sink is None and progress:
                sys.stdout.write("\r" + text)
                sys.stdout.flush()
                bar_shown = True
            return
        tail.append(text)
        if sink is not None:
            sink(text)
        else:
            if bar_shown:  # put the log line where the bar was (TTY) or below it
                sys.stdout.write("\r\x1b[2K" if tty else "\n")
                bar_shown = False
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    return emit


def _pump(proc: subprocess.Popen, emit: Callable[[str, bool], None]) -> None:
    """Split the child's output on '\\n' (log lines) and '\\r' (progress-bar redraws)."""
    assert proc.stdout is not None
    buf = b""
    while True:
        chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        buf += chunk
        while True:
            i_n, i_r = buf.find(b"\n"), buf.find(b"\r")
            cuts = [i for i in (i_n, i_r) if i >= 0]
            if not cuts:
                break
            i = min(cuts)
            piece, sep, buf = buf[:i], buf[i:i + 1], buf[i + 1:]
            emit(piece.decode("utf-8", "replace"), sep == b"\r")
    if buf:
        emit(buf.decode("utf-8", "replace"), False)


def read_vocab_size(tokens_uri: str, store: Any) -> int:
    from llm.storage import join

    try:
        meta = json.loads(store.get_bytes(join(tokens_uri, "meta.json")))
        return int(meta["vocab_size"])
    except FileNotFoundError:
        raise StageError(f"{tokens_uri}: no meta.json (is this a tokenize stage output?)") from None
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        raise StageError(f"{join(tokens_uri, 'meta.json')}: bad or missing vocab_size ({e})") from None


def training_counts(summary: dict[str, Any], *, with_sources: bool = False) -> dict[str, Any]:
    """The manifest counts every training stage reports (HELPERS.md contract)."""
    # "tokens" = positions computed (steps × total_batch_tokens, padding included); "supervised_tokens"
    # = targets that carried loss, the number SFT users compare.
    keys = ("params", "tokens", "supervised_tokens", "steps", "wall_s", "tokens_per_s", "mfu", "final_train_loss",
            "final_val_loss", "val_bpb")
    counts = {k: summary.get(k) for k in keys}
    if with_sources:
        counts["tokens_by_source"] = summary.get("tokens_by_source", {})
    return counts


def mlflow_settings(cfg: Any, stage: str) -> dict[str, Any]:
    return {"enabled": True, "tracking_uri": cfg.run.mlflow_tracking_uri, "experiment": cfg.run.mlflow_experiment,
            "run_name": f"{cfg.run.name}-{stage}"}


def upload_uri_for(cfg: Any, out: StageOutput) -> str | None:
    """Where to mirror checkpoints while training: the stage's ``.partial`` prefix on S3 (a local
    artifact root already holds the work dir, so nothing to mirror).

    Rank 0 writes the mirror; every rank resumes from it when its own dir has no checkpoint. So a
    multi-node follower, whose work dir is node-local scratch, gets the leader's ``.partial`` on a
    local root too: on a shared root (NFS) that is where rank 0's checkpoints are.
    """
    from llm.stages.output import workdir_for
    from llm.storage import is_s3

    if is_s3(cfg.run.artifact_root):
        return out.store.uri(out.stage, f"{out.key}.partial")
    if out.follower:
        return str(workdir_for(out.store, out.stage, out.key))
    return None


def run_pretrain(cfg: Any, out: StageOutput, inputs: dict[str, dict[str, Any]], *, progress: bool) -> dict[str, Any]:
    """Registry stage "pretrain": inputs "tokens" (tokenize output) and "tokenizer"."""
    from llm.model import GPTConfig
    from llm.storage import Store

    store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    tokens_uri = inputs["tokens"]["uri"]
    tokenizer_uri = inputs["tokenizer"]["uri"] if "tokenizer" in inputs else None
    vocab = read_vocab_size(tokens_uri, store)
    model_cfg = GPTConfig.from_model_config(cfg.model, vocab)
    summary = launch_training(
        stage="pretrain", model_config=model_cfg.to_dict(), train_config=cfg.pretrain, loader_kind="pretrain",
        loader_spec={"uri": tokens_uri, "split": "train", "val_split": "val"}, out_dir=out.workdir,
        tokenizer_uri=tokenizer_uri, seed=cfg.run.seed, upload_uri=upload_uri_for(cfg, out),
        s3_endpoint=cfg.run.s3_endpoint, mlflow=mlflow_settings(cfg, "pretrain"), progress=progress,
    )
    return {"counts": training_counts(summary), "model_config": model_cfg.to_dict(),
            "mlflow_run_id": summary.get("mlflow_run_id"), "best": summary.get("best"),
            "device": summary.get("device"), "world_size": summary.get("world_size"), "flops": summary.get("flops")}
