"""The trainer: ``torchrun --standalone --nproc_per_node=N -m llm.train.trainer --job job.json``.

One program for pretraining, midtraining and SFT; what differs is in the job file (written by
``llm.train.stages.launch_training``)::

    {
      "stage": "pretrain",                       # label for logs/MLflow
      "model": {GPTConfig fields incl. vocab_size},
      "train": {TrainConfig fields},             # llm.config.TrainConfig (or a subclass) as JSON
      "loader": {"kind": "pretrain", "spec": {...}},   # llm.train.loaders.LOADER_KINDS
      "tokenizer": "<uri>" | null,               # for bits-per-byte and samples
      "init_checkpoint": "<uri>" | null,         # start weights (midtrain/SFT); ignored when resuming
      "out_dir": "<local dir>",                  # checkpoints/, final/, metrics.jsonl, samples.json, summary.json
      "resume": "auto" | "none" | "<checkpoint uri>",
      "upload_uri": "<uri>" | null,              # mirror checkpoints here (the s3 artifact store)
      "s3_endpoint": "",
      "seed": 1337,
      "mlflow": {"enabled": true, "tracking_uri": "", "experiment": "kiln", "run_name": "pretrain"},
      "progress": true,
      "step_sleep_s": 0.0                        # optional throttle (tests that kill a run mid-way)
    }

It also runs without torchrun (``python -m llm.train.trainer --job ...``) as a single process.

Order of events: validate the batch plan (error before anything heavy) → init process group → build
model (or load init weights) → resume state if any → measure throughput on one micro-batch → print and
log the token plan → train (grad accumulation, clipping, schedule) with periodic eval, samples,
logging and checkpoints → ``final/`` + ``summary.json``. SIGTERM/SIGINT: finish the current step,
write a checkpoint, exit 0 with ``status.json`` = interrupted.

Token accounting (tests/test_token_accounting.py): "tokens" = steps × total_batch_tokens = input
positions computed (device_batch_size × seq_len × world × grad_accum per step, padding included), the
same number in metrics.jsonl, summary.json, checkpoint meta, plan.json and MLflow; tokens_by_source
splits it by source; "supervised_tokens" counts the targets that carry loss (y != -1). A ratio or
FLOPs budget is rounded up to whole steps.

Exact resume: the checkpoint holds weights, optimizer state, loader state (per rank), RNG states, step
and counters; nothing in the loop depends on anything else, so resuming on CPU reproduces an
uninterrupted run bit for bit (tested).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llm.dist import Dist, all_sum, barrier, gather_objects, init_distributed

# Peak dense bf16 tensor-core FLOP/s per GPU, for MFU. Matched by substring of torch.cuda.get_device_name(),
# first match wins (so the PCIe variants are listed before the generic name).
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("H200", 989.5e12), ("H800", 989.5e12),
    ("GH200", 989.5e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


class BatchPlanError(ValueError):
    """The batch sizes do not divide exactly: detected before any training starts."""


def peak_flops(device_name: str) -> float | None:
    for key, val in PEAK_FLOPS_BF16:
        if key in device_name:
            return val
    return None


def plan_batch(total_batch_tokens: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Gradient-accumulation steps so that one optimizer step sees exactly ``total_batch_tokens``."""
    per_micro = device_batch_size * seq_len * world_size
    if device_batch_size <= 0 or seq_len <= 0 or world_size <= 0 or total_batch_tokens <= 0:
        raise BatchPlanError("batch sizes must be positive")
    if total_batch_tokens % per_micro:
        lo = (total_batch_tokens // per_micro) * per_micro
        raise BatchPlanError(
            f"total_batch_tokens {total_batch_tokens} is not a multiple of device_batch_size {device_batch_size} "
            f"× seq_len {seq_len} × world_size {world_size} = {per_micro} tokens per micro-step; "
            f"use e.g. {max(lo, per_micro)} or {lo + per_micro}"
        )
    return total_batch_tokens // per_micro


def _whole_steps(budget_tokens: float, tokens_per_step: int) -> int:
    """Steps to reach ``budget_tokens``, rounded UP (at least one). The 1e-9 step of slack absorbs float
    error (0.1 × 30 / 3 is 1.0000000000000002, which must stay 1 step, not become 2)."""
    return max(1, math.ceil(budget_tokens / tokens_per_step - 1e-9))


def plan_tokens(train: Any, num_params: int, flops_per_token: int) -> dict[str, Any]:
    """The token budget: explicit steps win, then a FLOPs target, then tokens = ratio × params.

    A ratio or FLOPs budget is rounded UP to whole optimizer steps, so the run never trains on fewer
    tokens (or FLOPs) than asked and overshoots by less than one step. (It used to be ``round()``:
    nearest with ties to even, so a budget could silently land up to half a step short.) The plan
    carries the unrounded ``budget_tokens`` next to the ``tokens`` that will actually run.
    """
    tps = train.total_batch_tokens
    if train.steps is not None:
        steps, source = int(train.steps), f"steps={train.steps}"
        budget_tokens = float(steps * tps)
    elif train.target_flops:
        budget_tokens = train.target_flops / flops_per_token
        steps = _whole_steps(budget_tokens, tps)
        source = f"target_flops={train.target_flops:.3g}, rounded up to whole steps"
    else:
        budget_tokens = train.target_param_data_ratio * num_params
        steps = _whole_steps(budget_tokens, tps)
        source = f"tokens={train.target_param_data_ratio:g}×params={budget_tokens:,.0f}, rounded up to whole steps"
    tokens = steps * tps
    return {"budget": source, "budget_tokens": budget_tokens, "steps": steps, "tokens_per_step": tps,
            "tokens": tokens, "params": num_params, "flops_per_token": flops_per_token,
            "flops": float(flops_per_token) * tokens, "tokens_per_param": tokens / num_params}


# --------------------------------------------------------------------------- the run


class Trainer:
    def __init__(self, job: dict[str, Any]):
        from llm.config import TrainConfig
        from llm.model import GPT, GPTConfig

        self.job = job
        self.train = _train_config(job["train"], TrainConfig)
        self.mcfg = GPTConfig.from_dict(job["model"])
        self.out = Path(job["out_dir"])
        self.stage = job.get("stage", "train")
        self.seed = int(job.get("seed", 1337))
        tr = self.train
        world_env = int(os.environ.get("WORLD_SIZE", 1))
        # Before anything heavy: the batch plan must be exact.
        self.grad_accum = plan_batch(tr.total_batch_tokens, tr.device_batch_size, self.mcfg.seq_len, world_env)
        self.d = init_distributed(tr.device, tr.nccl_env)
        d = self.d
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # "auto": bf16 autocast on CUDA, fp32 on CPU (exact, and the CPU tests compare bits). An
        # explicit "bfloat16" also autocasts on CPU, for CPUs with bf16 units and to test the path.
        self.amp_dtype = None
        if (d.device.type == "cuda" and tr.dtype in ("auto", "bfloat16")) or tr.dtype == "bfloat16":
            self.amp_dtype = torch.bfloat16
        # Identical init on every rank (DDP also broadcasts, but then single- and multi-process runs match).
        with torch.device("meta"):
            model = GPT(self.mcfg)
        model.to_empty(device=d.device)
        torch.manual_seed(self.seed)
        model.init_weights()
        self.model = model
        self.n_params = model.num_params()
        self.flops_per_token = model.flops_per_token()
        self.opt = _build_opt(model, tr, d)
        self.tokenizer = _load_tokenizer(job.get("tokenizer"))
        from llm.train.loaders import make_loader

        loader = job["loader"]
        self.loader = make_loader(loader["kind"], loader.get("spec", {}), batch_size=tr.device_batch_size,
                                  seq_len=self.mcfg.seq_len, rank=d.rank, world_size=d.world, seed=self.seed,
                                  tokenizer=self.tokenizer)
        self.plan = plan_tokens(tr, self.n_params, self.flops_per_token)
        self.step = 0
        # Loss-bearing targets (y != -1) this rank has trained on; rank 0 also carries the global count
        # restored from a checkpoint. "tokens" counts input positions (padding included in SFT); this is
        # what SFT users compare, and equals "tokens" in pre/midtraining where every target is trained.
        self.supervised_local = 0
        self.supervised_known = True  # False after resuming a checkpoint written before it was counted
        self.wall_prev = 0.0
        self.best: dict[str, Any] | None = None
        self.mlflow_run_id: str | None = None
        self.last_val: dict[str, float] = {}
        self.samples: list[dict[str, Any]] = []
        self._stop = False
        self.step_sleep_s = float(job.get("step_sleep_s", 0.0))
        self.ckpt_root = self.out / "checkpoints"
        self.out.mkdir(parents=True, exist_ok=True)
        self._restore_or_init()
        self.ddp_model = model
        if tr.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.ddp_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        device_name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
        self.device_name = device_name
        self.peak = peak_flops(device_name) if d.device.type == "cuda" else None

    # ------------------------------------------------------------------ state
    def _restore_or_init(self) -> None:
        from llm.checkpoint import (CheckpointError, check_model_config, latest_checkpoint, load_state_into,
                                 load_training_state, resolve_checkpoint_dir)

        resume = self.job.get("resume", "auto") or "none"
        ckpt = None
        if resume == "auto":
            ckpt = latest_checkpoint(self.ckpt_root)
            if ckpt is None and self.job.get("upload_uri"):
                ckpt = _fetch_remote_latest(self.job["upload_uri"], self.job.get("s3_endpoint", ""), self.d)
        elif resume != "none":
            ckpt = resolve_checkpoint_dir(resume, endpoint_url=self.job.get("s3_endpoint", ""))
        if ckpt is not None:
            st = load_training_state(ckpt)
            meta = st["meta"]
            check_model_config(meta, self.mcfg.to_dict(), str(ckpt))
            for field in ("total_batch_tokens", "device_batch_size", "optimizer"):
                was = meta.get("train_config", {}).get(field)
                if was is not None and was != getattr(self.train, field):
                    raise CheckpointError(f"{ckpt}: cannot resume: train.{field} was {was!r}, now "
                                          f"{getattr(self.train, field)!r}")
            load_state_into(self.model, st["model"], str(ckpt))
            if st["optimizer"] is None or st["loader"] is None:
                raise CheckpointError(f"{ckpt}: has no optimizer/loader state, cannot resume training from it "
                                      f"(use it as init_checkpoint instead)")
            try:
                self.opt.load_state_dict(st["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{ckpt}: optimizer state does not fit ({e})") from e
            ls = st["loader"]
            ranks = ls["ranks"]
            if ls["world_size"] == self.d.world:
                mine = ranks[self.d.rank]
            elif all(r == ranks[0] for r in ranks):
                mine = ranks[0]  # rank-independent state (the pretrain loader's): any world size works
            else:
                raise CheckpointError(f"{ckpt}: loader state is per-rank for {ls['world_size']} processes; "
                                      f"resume with the same number of processes (now {self.d.world})")
            try:
                self.loader.load_state_dict(mine)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{ckpt}: loader state does not fit the data ({e})") from e
            if ls["world_size"] != self.d.world:
                # Each old rank's state held ITS share of tokens_seen_by_source (all shares equal, or we
                # would have refused above). Summing the new ranks' restored copies would count the
                # tokens before the checkpoint ×new/old world (2 procs -> 1 lost half of them): carry
                # the old global total on rank 0 and start the other ranks from zero.
                seen = self.loader.tokens_seen_by_source
                for k in list(seen):
                    seen[k] = int(seen[k]) * int(ls["world_size"]) if self.d.rank == 0 else 0
            if st["rng"] is not None:
                torch.set_rng_state(st["rng"]["cpu"])
                if self.d.device.type == "cuda" and st["rng"].get("cuda") is not None:
                    torch.cuda.set_rng_state(st["rng"]["cuda"], self.d.device)
            self.step = int(meta["step"])
            if meta.get("supervised_tokens") is None:
                self.supervised_known = False
            elif self.d.main:
                self.supervised_local = int(meta["supervised_tokens"])
            self.wall_prev = float(meta.get("wall_s", 0.0))
            self.best = meta.get("best")
            self.mlflow_run_id = meta.get("mlflow_run_id")
            self.last_val = meta.get("val", {}) or {}
            self.resumed_from = str(ckpt)
            self._log0(f"resumed from {ckpt} at step {self.step}")
            return
        self.resumed_from = None
        init = self.job.get("init_checkpoint")
        if init:
            from safetensors.torch import load_file

            from llm.checkpoint import MODEL_FILE, verify_checkpoint

            cdir = resolve_checkpoint_dir(init, endpoint_url=self.job.get("s3_endpoint", ""))
            meta = verify_checkpoint(cdir)
            check_model_config(meta, self.mcfg.to_dict(), str(cdir))
            load_state_into(self.model, load_file(str(cdir / MODEL_FILE), device="cpu"), str(cdir))
            self._log0(f"initialised weights from {cdir} (step {meta.get('step')} of {meta.get('stage')})")

    def _save(self, *, reason: str) -> Path:
        from llm.checkpoint import prune_checkpoints, save_checkpoint, step_dir_name

        d = self.d
        states = gather_objects(self.loader.state_dict(), d)
        self._supervised_global = self._sum_supervised()  # collective: every rank calls _save
        path = self.ckpt_root / step_dir_name(self.step)
        if d.main:
            rng = {"cpu": torch.get_rng_state()}
            if d.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(d.device)
            save_checkpoint(path, model_state=self.model.state_dict(), meta=self._meta(reason),
                            optimizer_state=self.opt.state_dict(), loader_state={"world_size": d.world, "ranks": states},
                            rng_state=rng)
            keep = {int(self.best["step"])} if self.best else set()
            prune_checkpoints(self.ckpt_root, self.train.keep_last, keep)
            uri = self._upload(path, f"checkpoints/{path.name}", prune_keep=keep)
            self.tracker.set_tags({"last_checkpoint": uri})
            self.checkpoint_uris.append(uri)
            self.tracker.log_dict({"checkpoints": self.checkpoint_uris}, "checkpoints.json")
            self._log0(f"checkpoint ({reason}) step {self.step} -> {uri}")
        barrier(d)
        return path

    def _upload(self, path: Path, rel: str, prune_keep: set[int] | None = None) -> str:
        """Mirror a checkpoint dir to ``upload_uri/rel`` (meta.json last); prune the remote step_* dirs to
        the newest keep_last plus ``prune_keep`` — from the remote listing, since a resumed run on a new
        machine does not have the old checkpoints locally."""
        up = self.job.get("upload_uri")
        if not up:
            return str(path)
        from llm.checkpoint import META_FILE, STEP_RE
        from llm.storage import Store, join

        store = Store(up, self.job.get("s3_endpoint", ""))
        dest = join(up, rel)
        for p in sorted(path.iterdir()):
            if p.name != META_FILE:
                store.put(p, join(dest, p.name))
        store.put(path / META_FILE, join(dest, META_FILE))  # last: marks the remote copy complete
        if prune_keep is not None:
            base = join(up, "checkpoints")
            steps = sorted({int(m.group(1)) for rel_, _ in store.iter_files(base)
                            if (m := STEP_RE.match(rel_.split("/")[0]))})
            keep = set(steps[-max(self.train.keep_last, 1):]) | prune_keep
            for s in steps:
                if s not in keep:
                    store.delete_prefix(join(base, f"step_{s:06d}"))
        return dest

    def _meta(self, reason: str) -> dict[str, Any]:
        return {"step": self.step, "stage": self.stage, "reason": reason, "model_config": self.mcfg.to_dict(),
                "train_config": self.train.model_dump(mode="json"), "tokens": self.step * self.train.total_batch_tokens,
                "supervised_tokens": getattr(self, "_supervised_global", None), "plan": self.plan, "val": self.last_val, "best": self.best, "wall_s": self._wall(),
                "mlflow_run_id": self.tracker.run_id, "loader_kind": self.job["loader"]["kind"],
                "tokenizer": self.job.get("tokenizer"), "seed": self.seed, "world_size": self.d.world,
                "time": time.time()}

    def _sum_supervised(self) -> int | None:
        """Loss-bearing targets over all ranks (a collective: call it on every rank)."""
        total = int(all_sum([float(self.supervised_local)], self.d)[0])  # exact in float64 below 2**53
        return total if self.supervised_known else None

    def _wall(self) -> float:
        return self.wall_prev + (time.time() - self.t_start)

    # ------------------------------------------------------------------ helpers
    def _log0(self, msg: str) -> None:
        if self.d.main:
            line = f"[{self.stage}] {msg}"
            if getattr(self, "bar", None) is not None:
                self.bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.d.device.type, dtype=self.amp_dtype)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.d.device.type == "cuda":
            return t.pin_memory().to(self.d.device, non_blocking=True)
        return t

    def _sync(self) -> None:
        if self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)

    def _measure_throughput(self) -> float:
        """Seconds per micro-batch, from one warm-up and one timed forward/backward on random tokens.
        Gradients are discarded and no RNG/loader/optimizer state is touched, so resume stays exact."""
        g = torch.Generator().manual_seed(0)
        B, T = self.train.device_batch_size, self.mcfg.seq_len
        x = self._to_device(torch.randint(0, self.mcfg.vocab_size, (B, T), generator=g))
        times = []
        for _ in range(2):
            self._sync()
            t0 = time.time()
            with self._autocast():
                loss = self.ddp_model(x, x)
            loss.backward()
            self._sync()
            times.append(time.time() - t0)
        self.opt.zero_grad()
        return times[-1]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val loss (mean nats/token) and bits-per-byte over ``eval_tokens`` of held-out data."""
        self.model.eval()
        tb = None
        if self.tokenizer is not None:
            tb = torch.as_tensor(self.tokenizer.token_bytes, dtype=torch.int64, device=self.d.device)
        loss_sum = n_tok = nats = n_bytes = 0.0
        for x, y in self.loader.val_batches(self.train.eval_tokens):
            x, y = self._to_device(x), self._to_device(y)
            with self._autocast():
                loss = self.model(x, y, reduction="none").float()
            valid = y != -1
            loss_sum += float(loss[valid].sum())
            n_tok += float(valid.sum())
            if tb is not None:
                nb = torch.where(valid, tb[y.clamp(min=0)], torch.zeros_like(y))
                nats += float((loss * (nb > 0)).sum())
                n_bytes += float(nb.sum())
        loss_sum, n_tok, nats, n_bytes = all_sum([loss_sum, n_tok, nats, n_bytes], self.d)
        self.model.train()
        out = {"val_loss": loss_sum / max(n_tok, 1.0)}
        if tb is not None and n_bytes > 0:
            out["val_bpb"] = nats / (math.log(2) * n_bytes)
        return out

    def sample(self) -> list[dict[str, Any]]:
        """Greedy continuations of the fixed prompts (rank 0 only)."""
        if self.tokenizer is None or not self.d.main or not self.train.sample_prompts:
            return []
        self.model.eval()
        out = []
        for prompt in self.train.sample_prompts:
            ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
            with self._autocast():
                new = list(self.model.generate(ids, max_new_tokens=24, temperature=0.0))
            out.append({"step": self.step, "prompt": prompt, "completion": self.tokenizer.decode(new)})
        self.model.train()
        return out

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        from llm.tracking import read_stage_inputs, start_tracker

        d, tr = self.d, self.train
        mlf = self.job.get("mlflow", {}) or {}
        self.t_start = time.time()
        self.tracker = start_tracker(rank=d.rank, enabled=mlf.get("enabled", True), tracking_uri_=mlf.get("tracking_uri", ""),
                                     experiment=mlf.get("experiment", "kiln"), run_name=mlf.get("run_name", self.stage),
                                     tags={"kiln.stage": self.stage}, resume_run_id=self.mlflow_run_id)
        self.checkpoint_uris: list[str] = []
        self._install_signals()
        metrics_path = self.out / "metrics.jsonl"
        if d.main:
            _truncate_metrics(metrics_path, self.step)
            samples_path = self.out / "samples.json"
            if samples_path.exists() and self.step > 0:
                self.samples = [s for s in json.loads(samples_path.read_text()) if s["step"] <= self.step]

        steps = self.plan["steps"]
        sec_per_micro = self._measure_throughput()
        est_tps = tr.total_batch_tokens / (sec_per_micro * self.grad_accum) if sec_per_micro > 0 else float("nan")
        remaining = steps - self.step
        plan = {**self.plan, "grad_accum": self.grad_accum, "world_size": d.world, "device": self.device_name,
                "autocast": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off (fp32)",
                "compiled": bool(tr.compile),
                "device_batch_size": tr.device_batch_size, "seq_len": self.mcfg.seq_len,
                "est_tokens_per_s": est_tps, "eta_s": remaining * tr.total_batch_tokens / est_tps,
                "start_step": self.step, "resumed_from": self.resumed_from,
                "params_non_embedding": self.n_params - self.model.num_embedding_params()}
        if d.main:
            (self.out / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
            self._log0(_plan_text(plan, self.mcfg))
            if self.step == 0 or self.tracker.run_id != self.mlflow_run_id:  # a new run (maybe a resume)
                self.tracker.log_params({"model": {**self.mcfg.to_dict(), "model_dim": self.mcfg.model_dim,
                                                   "n_heads": self.mcfg.n_heads, "params": self.n_params},
                                         "train": tr.model_dump(mode="json"),
                                         "plan": {k: plan[k] for k in ("budget", "budget_tokens", "steps", "tokens",
                                                                       "tokens_per_step", "flops", "flops_per_token",
                                                                       "grad_accum", "world_size") if k in plan},
                                         "loader": self.job["loader"], "seed": self.seed})
                if self.tracker.run_id is not None:  # the stage outputs it reads, as MLflow dataset inputs
                    spec = self.job["loader"].get("spec") or {}
                    self.tracker.log_inputs(self.stage, read_stage_inputs(
                        {"tokens": spec.get("uri") or spec.get("tokens_uri"), "tokenizer": self.job.get("tokenizer"),
                         "model": self.job.get("init_checkpoint")}, self.job.get("s3_endpoint") or ""))
            self.tracker.log_dict(plan, f"plan_step{self.step}.json")
            self.tracker.log_metrics({"plan/eta_s": plan["eta_s"], "plan/est_tokens_per_s": est_tps}, self.step)

        self.bar = None
        if d.main and self.job.get("progress", True):
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=self.step, desc=self.stage, unit="step", file=sys.stdout,
                            mininterval=1.0, dynamic_ncols=False, ncols=100)
        loss_acc = torch.zeros((), device=d.device, dtype=torch.float64)
        n_acc = 0
        t_log, tok_log = time.time(), 0
        last_train_loss = None
        metrics_f = open(metrics_path, "a") if d.main else None
        status = "done"
        try:
            while self.step < steps:
                mult = _lr_mult(tr, self.step, steps)
                self.opt.set_lr_multiplier(mult)
                for micro in range(self.grad_accum):
                    x, y = self.loader.next_batch()
                    self.supervised_local += int((y != -1).sum())
                    x, y = self._to_device(x), self._to_device(y)
                    sync = micro == self.grad_accum - 1
                    ctx = self.ddp_model.no_sync() if (d.world > 1 and not sync) else contextlib.nullcontext()
                    with ctx:
                        with self._autocast():
                            loss = self.ddp_model(x, y)
                        (loss / self.grad_accum).backward()
                    loss_acc += loss.detach().double()
                    n_acc += 1
                clip = tr.grad_clip if tr.grad_clip and tr.grad_clip > 0 else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self.opt.step()
                self.opt.zero_grad()
                self.step += 1
                tok_log += tr.total_batch_tokens
                if self.step_sleep_s:  # throttle for fault-injection tests and demos; never changes the math
                    time.sleep(self.step_sleep_s)
                if self.bar is not None:
                    self.bar.update(1)
                last = self.step == steps
                stop = self._stop_agreed()

                if self.step % tr.log_every == 0 or last or self.step == 1 or stop:
                    self._sync()
                    dt = time.time() - t_log
                    ls, ln, sup = all_sum([float(loss_acc), float(n_acc), float(self.supervised_local)], d)
                    last_train_loss = ls / max(ln, 1)
                    tps = tok_log / dt if dt > 0 else 0.0
                    row = {"step": self.step, "loss": last_train_loss, "lr": mult * tr.lr, "lr_mult": mult,
                           "grad_norm": float(gnorm), "tokens": self.step * tr.total_batch_tokens,
                           **({"supervised_tokens": int(sup)} if self.supervised_known else {}),
                           "tokens_per_s": tps, "mfu": self._mfu(tps), "epoch": self.loader.epoch,
                           "wall_s": self._wall()}
                    if d.device.type == "cuda":
                        row["gpu_mem_alloc_gb"] = torch.cuda.memory_allocated(d.device) / 2**30
                        row["gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(d.device) / 2**30
                    if (tr.eval_every and self.step % tr.eval_every == 0) or last:
                        self.last_val = self.evaluate()
                        row.update(self.last_val)
                        self._maybe_best()
                    self._emit(row, metrics_f)
                    loss_acc.zero_()
                    n_acc = 0
                    t_log, tok_log = time.time(), 0
                elif tr.eval_every and self.step % tr.eval_every == 0:
                    t_pause = time.time()
                    self.last_val = self.evaluate()
                    self._maybe_best()
                    self._emit({"step": self.step, "tokens": self.step * tr.total_batch_tokens, **self.last_val},
                               metrics_f)
                    # Eval time is not training throughput, but the steps since the last row are: shift
                    # the clock past the pause. (Restarting it here, as before, kept those steps' tokens
                    # in tok_log but dropped their time, so the next tokens_per_s/MFU read too high.)
                    t_log += time.time() - t_pause
                every = tr.sample_every or tr.eval_every
                if every and (self.step % every == 0 or last):
                    new = self.sample()
                    if new and d.main:
                        self.samples += new
                        _atomic_write(self.out / "samples.json", json.dumps(self.samples, indent=2))
                        self.tracker.log_dict(new, f"samples/step_{self.step:06d}.json")
                        for s in new:
                            self._log0(f"sample | {s['prompt']!r} -> {s['completion']!r}")
                if stop and not last:
                    status = "interrupted"
                    self._save(reason="signal")
                    break
                if (tr.ckpt_every and self.step % tr.ckpt_every == 0) or last:
                    t_pause = time.time()
                    self._save(reason="final" if last else "periodic")
                    t_log += time.time() - t_pause  # same: skip the pause, keep the steps' time
        except BaseException:
            if self.tracker is not None:
                self.tracker.end("FAILED")
            raise
        finally:
            if metrics_f:
                metrics_f.close()
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        return self._finish(status, last_train_loss)

    def _maybe_best(self) -> None:
        v = self.last_val.get("val_loss")
        if v is not None and (self.best is None or v < self.best["val_loss"]):
            self.best = {"step": self.step, "val_loss": v}

    def _mfu(self, tps: float) -> float | None:
        if not self.peak:
            return None
        return self.flops_per_token * tps / (self.peak * self.d.world)

    def _emit(self, row: dict[str, Any], f) -> None:
        if not self.d.main:
            return
        f.write(json.dumps(row) + "\n")
        f.flush()
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, row["step"])
        parts = [f"step {row['step']:>6}/{self.plan['steps']}"]
        for k, fmt in (("loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("val_bpb", "{:.4f}"), ("lr", "{:.2e}"),
                       ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}")):
            if row.get(k) is not None:
                parts.append(f"{k} " + fmt.format(row[k]))
        self._log0(" | ".join(parts))

    def _finish(self, status: str, last_train_loss: float | None) -> dict[str, Any]:
        from llm.checkpoint import save_checkpoint

        d = self.d
        by_source: dict[str, int] = {}
        for part in gather_objects(dict(self.loader.tokens_seen_by_source), d):
            for k, v in part.items():
                by_source[k] = by_source.get(k, 0) + int(v)
        wall = self._wall()
        tokens = self.step * self.train.total_batch_tokens
        self._supervised_global = self._sum_supervised()
        summary = {"status": status, "stage": self.stage, "params": self.n_params, "steps": self.step,
                   "planned_steps": self.plan["steps"], "tokens": tokens,
                   "supervised_tokens": self._supervised_global, "wall_s": wall,
                   "tokens_per_s": tokens / wall if wall > 0 else None,
                   "final_train_loss": last_train_loss, "final_val_loss": self.last_val.get("val_loss"),
                   "val_bpb": self.last_val.get("val_bpb"), "tokens_by_source": by_source, "best": self.best,
                   "flops": float(self.flops_per_token) * tokens, "world_size": d.world, "device": self.device_name,
                   "mlflow_run_id": self.tracker.run_id}
        summary["mfu"] = self._mfu(summary["tokens_per_s"] or 0.0) if summary["tokens_per_s"] else None
        if d.main:
            if status == "done":
                save_checkpoint(self.out / "final", model_state=self.model.state_dict(), meta=self._meta("final"))
                self._upload(self.out / "final", "final")
                # Relative to the stage output: the work dir it was written in is renamed on publish.
                summary["final_uri"] = "final"
            _atomic_write(self.out / "summary.json", json.dumps(summary, indent=2, default=str))
            _atomic_write(self.out / "status.json", json.dumps({"status": status, "step": self.step}))
            self.tracker.log_metrics({f"final/{k}": v for k, v in summary.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)}, self.step)
            self.tracker.log_dict(summary, "summary.json")
            if self.samples:
                self.tracker.log_dict(self.samples, "samples.json")
            self.tracker.end("FINISHED" if status == "done" else "KILLED")
            vals = ", ".join(f"{k} {v:.4f}" for k, v in self.last_val.items() if isinstance(v, (int, float)))
            loss = f"{last_train_loss:.4f}" if isinstance(last_train_loss, (int, float)) else "n/a"
            self._log0(f"{status}: {self.step} steps, {tokens:,} tokens in {wall:.1f}s; train loss {loss}"
                       + (f"; {vals}" if vals else ""))
        barrier(d)
        return summary

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self._stop = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _stop_agreed(self) -> bool:
        """All ranks must stop at the same step (checkpointing is collective)."""
        if self.d.world == 1:
            return self._stop
        t = torch.tensor([1.0 if self._stop else 0.0], device=self.d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


# --------------------------------------------------------------------------- small helpers


def _train_config(data: dict[str, Any], base: type) -> Any:
    """Validate the job's train section with TrainConfig, tolerating subclass fields (midtrain/SFT)."""
    known = set(base.model_fields)
    return base.model_validate({k: v for k, v in data.items() if k in known})


def _build_opt(model, tr, d: Dist):
    from llm.train.optim import build_optimizers

    return build_optimizers(model, tr, fused=d.device.type == "cuda")


def _lr_mult(tr, step: int, steps: int) -> float:
    from llm.train.optim import lr_multiplier

    return lr_multiplier(step, steps, schedule=tr.schedule, warmup_steps=tr.warmup_steps,
                         warmdown_frac=tr.warmdown_frac, min_lr_frac=tr.min_lr_frac)


def _load_tokenizer(uri: str | None):
    if not uri:
        return None
    from llm.tokenizer import load_tokenizer  # type: ignore[import-not-found]

    return load_tokenizer(uri)


def _fetch_remote_latest(upload_uri: str, endpoint: str, d: Dist) -> Path | None:
    from llm.checkpoint import META_FILE, resolve_checkpoint_dir
    from llm.storage import Store, join

    store = Store(upload_uri, endpoint)
    # An empty prefix lists as []; any other error (credentials, endpoint) must surface, not silently restart.
    metas = [u for u in store.list(join(upload_uri, "checkpoints")) if u.endswith("/" + META_FILE)]
    if not metas:
        return None
    latest = sorted(metas)[-1].rsplit("/", 1)[0]
    return resolve_checkpoint_dir(latest, endpoint_url=endpoint)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows from steps after the checkpoint (they will be recomputed)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a torn last line from a kill -9
    _atomic_write(path, "".join(k + "\n" for k in keep))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt_count(n: float) -> str:
    """1.44M, 11.22B: how people say model and data sizes."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_duration(seconds: float) -> str:
    return (f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60
            else f"{seconds:.0f} s")


def _plan_text(p: dict[str, Any], m: Any) -> str:
    eta_s = fmt_duration(p["eta_s"])
    return "\n".join([
        "token plan",
        f"  model      depth {m.depth}, dim {m.model_dim}, heads {m.n_heads}/{m.kv_heads} kv, head_dim {m.head_dim}, "
        f"seq_len {m.seq_len}, vocab {m.vocab_size}",
        f"  params     {p['params']:,} ({fmt_count(p['params'])}; non-embedding {p['params_non_embedding']:,})",
        f"  budget     {p['budget']}",
        f"  steps      {p['steps']:,} (starting at {p['start_step']})",
        f"  tokens     {p['tokens']:,} ({fmt_count(p['tokens'])}; {p['tokens_per_param']:.1f} per param)",
        f"  per step   {p['tokens_per_step']:,} tokens = {p['device_batch_size']} × {p['seq_len']} × "
        f"{p['world_size']} proc × {p['grad_accum']} accum",
        f"  FLOPs      {p['flops']:.3e} ({p['flops_per_token']:,} per token)",
        f"  device     {p['device']} × {p['world_size']}; autocast {p['autocast']}"
        + ("; torch.compile" if p["compiled"] else ""),
        f"  ETA        {eta_s} at a measured {p['est_tokens_per_s']:,.0f} tokens/s",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llm.train.trainer", description="Kiln trainer (run under torchrun)")
    ap.add_argument("--job", required=True, help="job JSON written by llm.train.stages.launch_training")
    args = ap.parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    try:
        trainer = Trainer(job)
    except BatchPlanError as e:
        print(f"[train] batch plan error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        summary = trainer.run()
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    from llm.dist import finish

    return finish(0 if summary["status"] in ("done", "interrupted") else 1)


if __name__ == "__main__":
    sys.exit(main())
