"""Training tokens/s: Kiln's trainer against nanochat HEAD's own model and optimizer, same run, interleaved.

nanochat is not part of Kiln and none of its code is copied here: the bench imports it from a checkout
(``--nanochat DIR``, default ``$NANOCHAT_DIR`` or ``../nanochat`` next to the repo) and runs:

* **nanochat** — ``nanochat.gpt.GPT(GPTConfig(...))`` built the way ``scripts/base_train.py`` builds it
  (meta device → ``to_empty`` → ``init_weights``; ``model_dim = depth·aspect_ratio`` rounded to ``head_dim``),
  its ``setup_optimizer`` (``MuonAdamW`` from ``nanochat/optim.py``, whose AdamW and Muon updates are always
  ``@torch.compile``-d by nanochat itself), and base_train's step: forward, backward, LR multiplier on every
  group, ``optimizer.step()``, ``zero_grad``, ``loss.item()``. With ``--compile`` the model is wrapped in
  ``torch.compile(model, dynamic=False)`` as base_train does (base_train always compiles; "uncompiled"
  means only the model is left eager — its optimizer steps stay compiled, as nanochat ships them).
* **kiln** — ``llm.train.trainer.Trainer`` built from a job (the one ``launch_training`` writes) and
  driven through ``Trainer.train_step``, the body of ``Trainer.run``: the real pretrain loader over token
  shards, grad clipping, the LR schedule, metrics rows every ``log_every`` steps, the optimizer step as the
  trainer builds it (``train.compile`` compiles the model and the optimizer updates).

Same shape (depth, width, heads, seq_len, vocab), batch, fp32, one thread, and the same token rows: the
random rows the nanochat side trains on are written as one-document-per-row token shards for Kiln's loader
(its packer returns each document as one row; the order differs, which cannot change speed). Timing:
``--warmup`` steps each (the first step's time, which includes compilation, is reported), then ``--windows``
windows of ``--steps`` steps, alternating nanochat, kiln, nanochat, kiln, … so that load from other
processes hits both alike; ``uptime`` is printed before and after.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vs_nanochat_train.py --nanochat ../nanochat
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vs_nanochat_train.py --nanochat ../nanochat --compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NANOCHAT_DTYPE", "float32")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from nanochat_checkout import HOW_TO_GET, find_nanochat  # noqa: E402

def make_rows(n: int, T: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``n`` random rows of ``T + 1`` tokens, each starting with BOS (id 0), as both sides train on."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, vocab, (n, T + 1), generator=g)
    rows[:, 0] = 0
    return rows


def write_shards(root: Path, rows: torch.Tensor, vocab: int) -> Path:
    """The rows as Kiln token shards, one document per row (val: the same rows; the bench never evaluates)."""
    n, L = rows.shape
    meta: dict[str, Any] = {"dtype": "uint16", "vocab_size": vocab, "bos_id": 0, "splits": {}}
    for split in ("train", "val"):
        (root / split).mkdir(parents=True, exist_ok=True)
        rows.numpy().astype(np.uint16).tofile(root / split / "shard_00000.bin")
        np.save(root / split / "shard_00000.idx.npy", np.arange(n, dtype=np.int64) * L)
        meta["splits"][split] = {"tokens": n * L, "docs": n, "shards": [f"{split}/shard_00000.bin"]}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


# --------------------------------------------------------------------------- nanochat


def nanochat_runner(args: argparse.Namespace, rows: torch.Tensor) -> Callable[[], float]:
    """A closure running one nanochat training step (base_train's), returning its loss."""
    from nanochat.gpt import GPT, GPTConfig  # type: ignore[import-not-found]

    base = args.depth * args.aspect_ratio
    dim = ((base + args.head_dim - 1) // args.head_dim) * args.head_dim
    cfg = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab, n_layer=args.depth, n_head=dim // args.head_dim,
                    n_kv_head=dim // args.head_dim, n_embd=dim, window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    opt = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28,
                                scalar_lr=0.5)  # base_train's defaults
    fwd = torch.compile(model, dynamic=False) if args.compile else model
    B, state = args.batch, {"i": 0}
    # contiguous (x, y) pairs, as nanochat's loader yields them
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in rows.split(B) if len(b) == B]

    def step() -> float:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = fwd(x, y)
        train_loss = loss.detach()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * 1.0
        opt.step()
        model.zero_grad(set_to_none=True)
        return train_loss.item()

    return step


# --------------------------------------------------------------------------- kiln


def kiln_runner(args: argparse.Namespace, tokens: Path, out: Path, total_steps: int):
    """The Kiln Trainer for the same shape, begun; returns (one-step closure, trainer)."""
    from llm.config import TrainConfig
    from llm.model import GPTConfig
    from llm.train.trainer import Trainer

    mc = GPTConfig(vocab_size=args.vocab, depth=args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                   seq_len=args.seq_len)
    tc = TrainConfig(device="cpu", nproc=1, device_batch_size=args.batch, total_batch_tokens=args.batch * args.seq_len,
                     steps=total_steps, optimizer="muon", lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                     dtype="float32", compile=args.compile, eval_every=0, log_every=args.log_every, ckpt_every=0,
                     eval_tokens=args.batch * args.seq_len, sample_prompts=[], warmup_steps=0)
    job = {"stage": "bench", "model": mc.to_dict(), "train": tc.model_dump(mode="json"),
           "loader": {"kind": "pretrain", "spec": {"uri": str(tokens)}}, "tokenizer": None, "out_dir": str(out),
           "resume": "none", "seed": 0, "mlflow": {"enabled": False}, "progress": False}
    trainer = Trainer(job)
    trainer._begin(total_steps)

    def step() -> float:
        trainer.train_step(total_steps)
        return 0.0

    return step, trainer


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], float], n: int) -> float:
    return timed_both(fn, n)[0]


def timed_both(fn: Callable[[], float], n: int) -> tuple[float, float]:
    """(wall, process CPU) seconds for ``n`` calls. With one thread the CPU time is the work done,
    less sensitive than wall time to other processes on a shared box."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0, time.process_time() - c0


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanochat", default=None, help="nanochat checkout (default $NANOCHAT_DIR or ../nanochat)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both (nanochat: as base_train --compile)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--window-pattern", default="L",
                    help="nanochat's attention windows; L (full causal, what Kiln computes) by default")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps per timing window")
    ap.add_argument("--windows", type=int, default=3, help="windows per side (interleaved)")
    ap.add_argument("--log-every", type=int, default=10, help="Kiln's metrics row period")
    args = ap.parse_args()
    nano = find_nanochat(args.nanochat)
    if nano is None:
        print(HOW_TO_GET)
        return 0
    sys.path.insert(0, str(nano))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    commit = subprocess.run(["git", "-C", str(nano), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    print(f"nanochat {nano} @ {commit} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"compile {args.compile} | d{args.depth} T={args.seq_len} B={args.batch} V={args.vocab} fp32", flush=True)
    print("uptime before:", uptime(), flush=True)
    total = args.warmup + args.windows * args.steps
    rows = make_rows(max(256, args.batch * (total + 1)), args.seq_len, args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = write_shards(Path(tmp) / "tokens", rows, args.vocab)
        t0 = time.perf_counter()
        sides = {"nanochat": nanochat_runner(args, rows)}
        build = {"nanochat": time.perf_counter() - t0}
        t0 = time.perf_counter()
        kstep, trainer = kiln_runner(args, tokens, Path(tmp) / "out", total_steps=total + 10)
        build["kiln"] = time.perf_counter() - t0  # includes the trainer's throughput probe (compiles the model)
        sides["kiln"] = kstep
        first: dict[str, float] = {}
        for name, fn in sides.items():
            first[name] = timed(fn, 1)
            timed(fn, args.warmup - 1)
        tps: dict[str, list[float]] = {k: [] for k in sides}
        cpu_tps: dict[str, list[float]] = {k: [] for k in sides}
        for w in range(args.windows):
            for name, fn in sides.items():
                dt, dc = timed_both(fn, args.steps)
                tps[name].append(args.steps * args.batch * args.seq_len / dt)
                cpu_tps[name].append(args.steps * args.batch * args.seq_len / dc)
                print(f"window {w + 1} {name:<9} {tps[name][-1]:>9,.0f} tok/s wall | {cpu_tps[name][-1]:>9,.0f} "
                      f"tok/CPU-s", flush=True)
        trainer.log.close()
    print("uptime after: ", uptime(), flush=True)
    step_tokens = args.batch * args.seq_len
    mean = {k: len(v) / sum(1 / x for x in v) for k, v in tps.items()}  # time-weighted mean over windows
    for k in sides:
        steady = step_tokens / mean[k]
        ready = build[k] + first[k]
        print(f"{k:<9} {mean[k]:>9,.0f} tok/s | steady {steady:.3f}s/step | build {build[k]:.1f}s + first step "
              f"{first[k]:.1f}s = {ready:.1f}s to the first step done (compile included when on)")
    cpu = {k: len(v) / sum(1 / x for x in v) for k, v in cpu_tps.items()}
    print(f"RATIO kiln/nanochat = {mean['kiln'] / mean['nanochat']:.3f} wall, {cpu['kiln'] / cpu['nanochat']:.3f} "
          f"CPU time ({'compiled' if args.compile else 'eager'}; CPU: kiln {cpu['kiln']:,.0f} vs nanochat "
          f"{cpu['nanochat']:,.0f} tok/CPU-s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
