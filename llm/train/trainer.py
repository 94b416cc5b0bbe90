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

This file is the loop; its collaborators each have one job: ``llm.train.plan`` (the token plan and
its text), ``llm.train.runlog`` (metrics.jsonl, MLflow, the progress bar, printed lines),
``llm.train.checkpointer`` (save, mirror, prune, resume), ``llm.eval.loss`` (held-out loss and
bits per byte) and ``llm.eval.samples`` (greedy samples).

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
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llm.eval.loss import evaluate_loss
from llm.eval.samples import complete
from llm.storage import write_atomic
from llm.train.checkpointer import Checkpointer
from llm.train.plan import BatchPlanError, peak_flops, plan_batch, plan_text, plan_tokens
from llm.train.runlog import Interval, RunLog
from llm.dist import Dist, all_sum, barrier, gather_objects, init_distributed

# Tokens generated per sample prompt during training (a glance at what the model says, not a benchmark).
SAMPLE_TOKENS = 24


# --------------------------------------------------------------------------- the run


class Trainer:
    """One training run, built from a job file; :meth:`run` trains it to the planned step."""

    def __init__(self, job: dict[str, Any]):
        from llm.config import TrainConfig
        from llm.model import GPTConfig
        from llm.train.optim import scaled_for_depth

        self.job = job
        self.mcfg = GPTConfig.from_dict(job["model"])
        self.train = tr = scaled_for_depth(_train_config(job["train"], TrainConfig), self.mcfg)
        self.out = Path(job["out_dir"])
        self.stage = job.get("stage", "train")
        self.seed = int(job.get("seed", 1337))
        # Before anything heavy: the batch plan must be exact.
        self.grad_accum = plan_batch(tr.total_batch_tokens, tr.device_batch_size, self.mcfg.seq_len,
                                     int(os.environ.get("WORLD_SIZE", 1)))
        self.d = d = init_distributed(tr.device, tr.nccl_env)
        self.amp_dtype = _amp_dtype(d.device, tr.dtype)
        self.model = _build_model(self.mcfg, d.device, self.seed)
        self.n_params, self.flops_per_token = self.model.num_params(), self.model.flops_per_token()
        self.opt = _build_opt(self.model, tr, d)
        self.tokenizer = _load_tokenizer(job.get("tokenizer"))
        self.loader = _build_loader(job["loader"], tr, self.mcfg.seq_len, d, self.seed, self.tokenizer)
        self.plan = plan_tokens(tr, self.n_params, self.flops_per_token, self.model.num_scaling_params())
        self._init_counters()
        self.log = RunLog(self.stage, main=d.main)
        self.ckpt = Checkpointer(self.out, upload_uri=job.get("upload_uri"), endpoint=job.get("s3_endpoint", ""),
                                 keep_last=tr.keep_last, rank=d.rank, world=d.world, device=d.device)
        self.out.mkdir(parents=True, exist_ok=True)
        self._restore_or_init()
        self.ddp_model = _wrap(self.model, tr.compile, d)
        self.device_name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
        self.peak = peak_flops(self.device_name) if d.device.type == "cuda" else None

    # ------------------------------------------------------------------ state
    def _init_counters(self) -> None:
        """The run's counters at step 0; a resume overwrites them from the checkpoint meta."""
        self.step = 0
        # Loss-bearing targets (y != -1) this rank has trained on; rank 0 also carries the global count
        # restored from a checkpoint. "tokens" counts input positions (padding included in SFT); this is
        # what SFT users compare, and equals "tokens" in pre/midtraining where every target is trained.
        self.supervised_local = 0
        self.supervised_known = True  # False after resuming a checkpoint written before it was counted
        self.supervised_global: int | None = None  # the all-rank count at the last checkpoint/summary
        self.wall_prev = 0.0
        self.best: dict[str, Any] | None = None
        self.mlflow_run_id: str | None = None
        self.last_val: dict[str, float] = {}
        self.last_train_loss: float | None = None
        self.resumed_from: str | None = None
        self._stop = False
        self.step_sleep_s = float(self.job.get("step_sleep_s", 0.0))

    def _restore_or_init(self) -> None:
        """Resume from a checkpoint when there is one; else start from the init weights, if any."""
        ckpt = self.ckpt.find(self.job.get("resume", "auto") or "none")
        if ckpt is not None:
            meta = self.ckpt.restore(ckpt, model=self.model, opt=self.opt, loader=self.loader,
                                     model_config=self.mcfg.to_dict(), train=self.train)
            self._resume_counters(meta)
            self.resumed_from = str(ckpt)
            self.log.line(f"resumed from {ckpt} at step {self.step}")
        elif self.job.get("init_checkpoint"):
            cdir, meta = self.ckpt.load_init(self.job["init_checkpoint"], self.model, self.mcfg.to_dict())
            self.log.line(f"initialised weights from {cdir} (step {meta.get('step')} of {meta.get('stage')})")

    def _resume_counters(self, meta: dict[str, Any]) -> None:
        self.step = int(meta["step"])
        if meta.get("supervised_tokens") is None:
            self.supervised_known = False
        elif self.d.main:
            self.supervised_local = int(meta["supervised_tokens"])
        self.wall_prev = float(meta.get("wall_s", 0.0))
        self.best = meta.get("best")
        self.mlflow_run_id = meta.get("mlflow_run_id")
        self.last_val = meta.get("val", {}) or {}

    def _meta(self, reason: str) -> dict[str, Any]:
        """Checkpoint meta: everything a resume restores besides tensors, and what the run was."""
        return {"step": self.step, "stage": self.stage, "reason": reason, "model_config": self.mcfg.to_dict(),
                "train_config": self.train.model_dump(mode="json"), "tokens": self.step * self.train.total_batch_tokens,
                "supervised_tokens": self.supervised_global, "plan": self.plan, "val": self.last_val,
                "best": self.best, "wall_s": self._wall(), "mlflow_run_id": self.log.tracker.run_id,
                "loader_kind": self.job["loader"]["kind"], "tokenizer": self.job.get("tokenizer"), "seed": self.seed,
                "world_size": self.d.world, "time": time.time()}

    def _sum_supervised(self) -> int | None:
        """Loss-bearing targets over all ranks (a collective: call it on every rank)."""
        total = int(all_sum([float(self.supervised_local)], self.d)[0])  # exact in float64 below 2**53
        return total if self.supervised_known else None

    def _wall(self) -> float:
        return self.wall_prev + (time.time() - self.t_start)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train from ``self.step`` to the planned step; returns the summary (also in summary.json).

        Each iteration is one optimizer step, then whatever that step is due for: a metrics row (with
        the held-out eval when due), samples, a checkpoint. A stop signal ends the loop at a step that
        every rank agrees on, with a checkpoint.
        """
        steps = self.plan["steps"]
        self._begin(steps)
        status = "done"
        try:
            while self.step < steps:
                if not self.train_step(steps):
                    status = "interrupted"
                    break
        except BaseException:
            self.log.failed()
            raise
        finally:
            self.log.close()
        return self._finish(status)

    def train_step(self, steps: int) -> bool:
        """One iteration of the loop: an optimizer step, then whatever it is due for (a metrics row, samples,
        a checkpoint). Returns False when a stop signal ended the run here (after its checkpoint). Public so
        that benchmarks time exactly what :meth:`run` does, step by step."""
        tr = self.train
        mult, gnorm = self._optimizer_step(steps)
        last, stop = self.step == steps, self._stop_agreed()
        self._report(mult, gnorm, last=last, stop=stop)
        self._sample(last=last)
        if stop and not last:
            self._save("signal")
            return False
        if _every(self.step, tr.ckpt_every) or last:
            with self.interval.paused():  # a checkpoint's time is not training throughput
                self._save("final" if last else "periodic")
        return True

    def _begin(self, steps: int) -> None:
        """Before step one: the MLflow run (the checkpoint's, on resume), signals, the measured plan, the bar."""
        from llm.tracking import start_tracker

        mlf = self.job.get("mlflow", {}) or {}
        self.t_start = time.time()
        tracker = start_tracker(rank=self.d.rank, enabled=mlf.get("enabled", True),
                                tracking_uri_=mlf.get("tracking_uri", ""), experiment=mlf.get("experiment", "kiln"),
                                run_name=mlf.get("run_name", self.stage), tags={"kiln.stage": self.stage},
                                resume_run_id=self.mlflow_run_id, system_metrics=True)
        self._install_signals()
        self.log.attach(self.out, tracker, self.step)
        self._log_plan(self._measured_plan())
        self.log.open(steps, self.step, progress=bool(self.job.get("progress", True)))
        self.interval = Interval(self.d.device)

    def _optimizer_step(self, steps: int) -> tuple[float, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches (DDP syncs gradients on the last one only)."""
        tr, d = self.train, self.d
        mult = _lr_mult(tr, self.step, steps)
        self.opt.set_lr_multiplier(mult)
        self.opt.set_step(self.step, steps)  # per-step Muon momentum / weight decay schedules (llm.train.optim)
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
            self.interval.add_micro(loss.detach())
        clip = tr.grad_clip if tr.grad_clip and tr.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        self.opt.zero_grad()
        self.step += 1
        self.interval.tokens += tr.total_batch_tokens
        if self.step_sleep_s:  # throttle for fault-injection tests and demos; never changes the math
            time.sleep(self.step_sleep_s)
        self.log.tick()
        return mult, gnorm

    def _report(self, mult: float, gnorm: torch.Tensor, *, last: bool, stop: bool) -> None:
        """A metrics row when due (every ``log_every`` steps, the first, the last, on a stop), carrying the
        held-out eval when that is due too; between rows, a due eval gets a row of its own."""
        tr = self.train
        eval_due = _every(self.step, tr.eval_every) or last
        if self.step % tr.log_every == 0 or last or self.step == 1 or stop:
            row = self._train_row(mult, gnorm)
            if eval_due:
                row.update(self._evaluate())
            self.log.row(row)
            self.interval.reset()
        elif eval_due:
            with self.interval.paused():  # eval time is not training throughput
                self.log.row({"step": self.step, "tokens": self.step * tr.total_batch_tokens, **self._evaluate()})

    def _train_row(self, mult: float, gnorm: torch.Tensor) -> dict[str, Any]:
        """The training metrics since the last row (loss and counts summed over ranks)."""
        tr, d, iv = self.train, self.d, self.interval
        self._sync()
        tps = iv.tokens_per_s()
        ls, ln, sup = all_sum([float(iv.loss_sum), float(iv.micro_steps), float(self.supervised_local)], d)
        self.last_train_loss = ls / max(ln, 1)
        row = {"step": self.step, "loss": self.last_train_loss, "lr": mult * tr.lr, "lr_mult": mult,
               "grad_norm": float(gnorm), "tokens": self.step * tr.total_batch_tokens,
               **({"supervised_tokens": int(sup)} if self.supervised_known else {}),
               "tokens_per_s": tps, "mfu": self._mfu(tps), "epoch": self.loader.epoch, "wall_s": self._wall()}
        if d.device.type == "cuda":
            row["gpu_mem_alloc_gb"] = torch.cuda.memory_allocated(d.device) / 2**30
            row["gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(d.device) / 2**30
        return row

    def _evaluate(self) -> dict[str, float]:
        """Evaluate now; remember the result (checkpoint meta, summary) and the best val loss so far."""
        self.last_val = self.evaluate()
        v = self.last_val.get("val_loss")
        if v is not None and (self.best is None or v < self.best["val_loss"]):
            self.best = {"step": self.step, "val_loss": v}
        return self.last_val

    def evaluate(self) -> dict[str, float]:
        """Val loss (mean nats/token) and bits-per-byte over ``eval_tokens`` of held-out data, all ranks."""
        tb = self.tokenizer.token_bytes if self.tokenizer is not None else None
        sums = evaluate_loss(self.model, self.loader.val_batches(self.train.eval_tokens), token_bytes=tb,
                             amp_dtype=self.amp_dtype, reduce=lambda values: all_sum(values, self.d))
        out = {"val_loss": sums.mean_loss}
        if tb is not None and sums.bytes > 0:
            out["val_bpb"] = sums.bpb
        return out

    def _sample(self, *, last: bool) -> None:
        """Greedy continuations of the fixed prompts (rank 0), every ``sample_every`` (else ``eval_every``)
        steps and at the end."""
        tr = self.train
        every = tr.sample_every or tr.eval_every
        if not every or not (self.step % every == 0 or last):
            return
        if self.tokenizer is None or not self.d.main or not tr.sample_prompts:
            return
        new = complete(self.model, self.tokenizer, tr.sample_prompts, SAMPLE_TOKENS, amp_dtype=self.amp_dtype)
        self.log.add_samples([{"step": self.step, **s} for s in new], self.step)

    def _save(self, reason: str) -> None:
        """A checkpoint of this step: a collective (every rank calls it), written by rank 0."""
        d = self.d
        states = gather_objects(self.loader.state_dict(), d)
        self.supervised_global = self._sum_supervised()
        if d.main:
            keep = {int(self.best["step"])} if self.best else set()
            uri = self.ckpt.save(self.step, model=self.model, opt=self.opt, loader_states=states,
                                 meta=self._meta(reason), keep_steps=keep)
            self.log.checkpoint(uri, reason, self.step)
        barrier(d)

    def _finish(self, status: str) -> dict[str, Any]:
        """``final/`` (when done), summary.json, status.json, the end of the MLflow run; returns the summary."""
        summary = self._summary(status)
        if self.d.main:
            if status == "done":
                self.ckpt.save_final(self.model, self._meta("final"))
                # Relative to the stage output: the work dir it was written in is renamed on publish.
                summary["final_uri"] = "final"
                summary["mlflow_model_id"] = self._log_final_model(summary)
            self.log.finish(summary, self.last_val)
        barrier(self.d)
        return summary

    def _log_final_model(self, summary: dict[str, Any]) -> str | None:
        """The final checkpoint as an MLflow 3 LoggedModel of this run (None when not tracking)."""
        return self.log.tracker.log_model(
            self.stage, params={"model": self.mcfg.to_dict(), "train": self.train.model_dump(mode="json"),
                                "seed": self.seed},
            tags={"kiln.stage": self.stage, "kiln.checkpoint": "final"}, step=self.step,
            metrics={k: summary[k] for k in ("final_train_loss", "final_val_loss", "val_bpb")},
            files=(self.out / "final" / "meta.json",))

    def _summary(self, status: str) -> dict[str, Any]:
        """What the run did, over all ranks (a collective)."""
        d = self.d
        by_source: dict[str, int] = {}
        for part in gather_objects(dict(self.loader.tokens_seen_by_source), d):
            for k, v in part.items():
                by_source[k] = by_source.get(k, 0) + int(v)
        wall = self._wall()
        tokens = self.step * self.train.total_batch_tokens
        self.supervised_global = self._sum_supervised()
        summary = {"status": status, "stage": self.stage, "params": self.n_params, "steps": self.step,
                   "planned_steps": self.plan["steps"], "tokens": tokens,
                   "supervised_tokens": self.supervised_global, "wall_s": wall,
                   "tokens_per_s": tokens / wall if wall > 0 else None,
                   "final_train_loss": self.last_train_loss, "final_val_loss": self.last_val.get("val_loss"),
                   "val_bpb": self.last_val.get("val_bpb"), "tokens_by_source": by_source, "best": self.best,
                   "flops": float(self.flops_per_token) * tokens, "world_size": d.world, "device": self.device_name,
                   "mlflow_run_id": self.log.tracker.run_id}
        summary["mfu"] = self._mfu(summary["tokens_per_s"] or 0.0) if summary["tokens_per_s"] else None
        return summary

    # ------------------------------------------------------------------ the plan
    def _measured_plan(self) -> dict[str, Any]:
        """The token plan plus how this run executes it and a measured ETA (``plan.json``)."""
        tr = self.train
        sec_per_micro = self._measure_throughput()
        est_tps = tr.total_batch_tokens / (sec_per_micro * self.grad_accum) if sec_per_micro > 0 else float("nan")
        remaining = self.plan["steps"] - self.step
        return {**self.plan, "grad_accum": self.grad_accum, "world_size": self.d.world, "device": self.device_name,
                "autocast": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off (fp32)",
                "compiled": bool(tr.compile),
                "device_batch_size": tr.device_batch_size, "seq_len": self.mcfg.seq_len,
                "est_tokens_per_s": est_tps, "eta_s": remaining * tr.total_batch_tokens / est_tps,
                "start_step": self.step, "resumed_from": self.resumed_from,
                "params_non_embedding": self.n_params - self.model.num_embedding_params()}

    def _log_plan(self, plan: dict[str, Any]) -> None:
        """Write plan.json, print the plan, log it to MLflow (params only when the MLflow run is new)."""
        if not self.d.main:
            return
        write_atomic(self.out / "plan.json", json.dumps(plan, indent=2, default=str))
        self.log.line(plan_text(plan, self.mcfg))
        tracker = self.log.tracker
        if self.step == 0 or tracker.run_id != self.mlflow_run_id:  # a new run (maybe a resume)
            self._log_params(tracker, plan)
        tracker.log_dict(plan, f"plan_step{self.step}.json")
        tracker.log_metrics({"plan/eta_s": plan["eta_s"], "plan/est_tokens_per_s": plan["est_tokens_per_s"]},
                            self.step)

    def _log_params(self, tracker: Any, plan: dict[str, Any]) -> None:
        from llm.tracking import read_stage_inputs

        mc = self.mcfg
        tracker.log_params({"model": {**mc.to_dict(), "model_dim": mc.model_dim, "n_heads": mc.n_heads,
                                      "params": self.n_params},
                            "train": self.train.model_dump(mode="json"),
                            "plan": {k: plan[k] for k in ("budget", "budget_tokens", "steps", "tokens",
                                                          "tokens_per_step", "flops", "flops_per_token",
                                                          "grad_accum", "world_size") if k in plan},
                            "loader": self.job["loader"], "seed": self.seed})
        if tracker.run_id is not None:  # the stage outputs it reads, as MLflow dataset inputs
            spec = self.job["loader"].get("spec") or {}
            tracker.log_inputs(self.stage, read_stage_inputs(
                {"tokens": spec.get("uri") or spec.get("tokens_uri"), "tokenizer": self.job.get("tokenizer"),
                 "model": self.job.get("init_checkpoint")}, self.job.get("s3_endpoint") or ""))

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

    # ------------------------------------------------------------------ device helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
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

    def _mfu(self, tps: float) -> float | None:
        if not self.peak:
            return None
        return self.flops_per_token * tps / (self.peak * self.d.world)

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


# --------------------------------------------------------------------------- building blocks


def _every(step: int, every: int | None) -> bool:
    """``step`` is a multiple of a period that may be 0/None (never)."""
    return bool(every) and step % every == 0


def _train_config(data: dict[str, Any], base: type) -> Any:
    """Validate the job's train section with TrainConfig, tolerating subclass fields (midtrain/SFT)."""
    known = set(base.model_fields)
    return base.model_validate({k: v for k, v in data.items() if k in known})


def _amp_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for ``train.dtype``: with "auto", bf16 on CUDA and fp32 on CPU (exact, and the
    CPU tests compare bits); an explicit "bfloat16" also autocasts on CPU (bf16 CPUs, and to test the path)."""
    if (device.type == "cuda" and dtype in ("auto", "bfloat16")) or dtype == "bfloat16":
        return torch.bfloat16
    return None


def _build_model(mcfg: Any, device: torch.device, seed: int) -> Any:
    """The model on ``device``, initialised from ``seed``: identical on every rank (DDP also
    broadcasts, but then single- and multi-process runs match)."""
    from llm.model import GPT

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.device("meta"):
        model = GPT(mcfg)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _build_opt(model, tr, d: Dist):
    from llm.train.optim import build_optimizers

    return build_optimizers(model, tr, fused=d.device.type == "cuda", compile=bool(tr.compile))


def _build_loader(loader: dict[str, Any], tr: Any, seq_len: int, d: Dist, seed: int, tokenizer: Any) -> Any:
    from llm.train.loaders import make_loader

    return make_loader(loader["kind"], loader.get("spec", {}), batch_size=tr.device_batch_size, seq_len=seq_len,
                       rank=d.rank, world_size=d.world, seed=seed, tokenizer=tokenizer)


def _wrap(model: Any, compile_: bool, d: Dist) -> Any:
    """What the loop calls: the model, compiled and/or in DDP (checkpoints save the plain model)."""
    wrapped = torch.compile(model) if compile_ else model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return wrapped


def _lr_mult(tr, step: int, steps: int) -> float:
    from llm.train.optim import lr_multiplier

    return lr_multiplier(step, steps, schedule=tr.schedule, warmup_steps=tr.warmup_steps,
                         warmdown_frac=tr.warmdown_frac, min_lr_frac=tr.min_lr_frac)


def _load_tokenizer(uri: str | None):
    if not uri:
        return None
    from llm.tokenizer import load_tokenizer  # type: ignore[import-not-found]

    return load_tokenizer(uri)


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
