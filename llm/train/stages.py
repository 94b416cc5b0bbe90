"""Training stages: run ``llm.train.trainer`` under torchrun and turn its result into a manifest.

:func:`launch_training` is the one reusable entry point — pretraining (:func:`run_pretrain`, registry
stage "pretrain") and the chat stages (midtrain/SFT) all call it with their own train config, loader
kind/spec and init checkpoint. It

1. picks the process count (``train.nproc``, or the GPU count, or 1 on CPU: ``llm.dist``) and the
   rendezvous (``--standalone``, or multi-node from ``KILN_NNODES``/``KILN_RDZV_ENDPOINT``: ``llm.torchrun``),
2. checks the batch plan BEFORE launching (an indivisible batch is a :class:`~llm.stages.output.StageError`),
3. writes ``job.json`` into the output dir and runs ``torchrun ... -m llm.train.trainer --job job.json``
   through :func:`llm.torchrun.launch` (output streamed or sent to a :func:`~llm.torchrun.line_sink`,
   SIGTERM/Ctrl-C forwarded so the job checkpoints, the job dying with this process),
4. fails with the exit code and the last lines of output (:class:`~llm.torchrun.TrainingFailed`), or
   returns ``summary.json``; on a multi-node follower (``KILN_NODE_RANK`` > 0) it raises
   :class:`~llm.stages.output.FollowerDone` instead: rank 0, on node 0, wrote the summary and that node publishes.

Resume is automatic: the stage work dir (``<key>.partial``) survives a crash, and the trainer resumes
from its newest checkpoint (or from the S3 mirror of it when the artifact root is ``s3://``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llm.stages.output import FollowerDone, StageError, StageOutput
from llm.storage import write_atomic
from llm.torchrun import LineSink, TrainingFailed, launch, multi_node, rendezvous_args


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
    from llm.dist import resolve_devices
    from llm.model import GPTConfig
    from llm.train.optim import scaled_for_depth
    from llm.train.plan import BatchPlanError, plan_batch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = nproc or resolve_devices(train_config, stage)[1]
    mc = GPTConfig.from_dict(model_config)
    child_env = dict(os.environ)
    if s3_endpoint:  # the job reads shards/tokenizer/checkpoints from s3:// through boto3's env chain
        child_env.setdefault("AWS_ENDPOINT_URL", s3_endpoint)
    child_env.update({k: str(v) for k, v in train_config.nccl_env.items()})
    child_env.update(env or {})
    nodes = multi_node(child_env)
    scaled = scaled_for_depth(train_config, mc)  # the batch the trainer will use
    try:
        plan_batch(scaled.total_batch_tokens, scaled.device_batch_size, mc.seq_len,
                   n * (nodes.nnodes if nodes else 1))
    except BatchPlanError as e:
        why = f" (total_batch_tokens {scaled.total_batch_tokens} comes from {stage}.depth_scaling)" \
            if train_config.depth_scaling else ""
        raise StageError(f"{stage}: {e}{why}") from None
    job = {
        "stage": stage, "model": mc.to_dict(), "train": train_config.model_dump(mode="json"),
        "loader": {"kind": loader_kind, "spec": loader_spec}, "tokenizer": tokenizer_uri,
        "init_checkpoint": init_checkpoint, "out_dir": str(out_dir.resolve()), "resume": resume,
        "upload_uri": upload_uri, "s3_endpoint": s3_endpoint, "seed": seed,
        "mlflow": mlflow or {"enabled": False}, "progress": progress,
    }
    job_path = out_dir / "job.json"
    write_atomic(job_path, json.dumps(job, indent=2))
    tail = _run_trainer(stage, job_path, n, child_env, progress, on_line)
    if nodes is not None and not nodes.leader:
        # Global rank 0, the only rank that writes checkpoints and summary.json, runs on node 0.
        raise FollowerDone(f"{stage}: node {nodes.rank} of {nodes.nnodes} is a follower: training finished on every "
                           f"node; node 0 publishes the output, this node publishes nothing")
    return _read_summary(stage, out_dir, tail)


def _run_trainer(stage: str, job_path: Path, nproc: int, env: dict[str, str], progress: bool,
                 on_line: LineSink | None) -> list[str]:
    """The trainer under torchrun; a batch plan the ranks refuse (exit 2) is a StageError, like one refused here."""
    try:
        return launch("llm.train.trainer", ["--job", str(job_path)], label=stage, nproc=nproc, env=env,
                      rendezvous=rendezvous_args(env), progress=progress, on_line=on_line)
    except TrainingFailed as e:
        plan_errors = [t for t in e.tail if "batch plan error" in t]
        if e.code == 2 and plan_errors:
            raise StageError(f"{stage}: " + plan_errors[0]) from None
        raise


def _read_summary(stage: str, out_dir: Path, tail: list[str]) -> dict[str, Any]:
    """The finished job's ``summary.json``; a job that stopped early (a signal) is an error saying how to resume."""
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise TrainingFailed(stage, 0, tail + ["(no summary.json written)"])
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "done":
        raise RuntimeError(f"{stage}: training stopped at step {summary.get('steps')} of {summary.get('planned_steps')} "
                           f"({summary.get('status')}); its checkpoint is in {out_dir}, run again to resume")
    return summary


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
