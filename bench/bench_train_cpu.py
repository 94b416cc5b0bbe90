"""CPU training throughput: the Kiln trainer vs a plain training loop at nanochat-equivalent settings.

What is compared (same machine, same run, same threads):

* **reference** — the nanochat-equivalent configuration trained by the plainest possible loop: the
  same model shape and optimizer math (nanochat's recipe: rotary, QK-norm, ReLU², untied head, soft-cap,
  Muon for matrices + AdamW for embeddings), batches pre-generated in memory, ``loss.backward();
  opt.step()`` and nothing else — no data loader, no gradient clipping, no LR schedule, no logging,
  no checkpoints, no process launch. nanochat itself cannot be installed offline here, and its code is
  not copied; this loop is the upper bound any trainer with this model could reach on this CPU.
* **kiln** — ``llm.train.stages.launch_training`` → ``torchrun`` → ``llm.train.trainer`` with the real pretrain
  loader reading memmapped token shards (BOS-aligned best-fit packing), grad clipping, the LR schedule,
  metrics.jsonl, periodic checkpoints (every ``--ckpt-every`` steps) and the end-of-run eval. Tokens/s
  is the trainer's own steady-state figure from metrics.jsonl (intervals after the first ``--warmup``
  steps; startup and the final eval are excluded, checkpoint time is included).

Configurations:

* ``nanochat-cpu``: nanochat's CPU demo (dev/runcpu.sh): depth 4, seq_len 1024, device batch 1,
  total batch 1024 tokens, vocab 65,536, head_dim 128 (model_dim 256, 2 heads), Muon, OMP_NUM_THREADS=1.
* ``tiny``: Kiln's tiny preset shape (depth 2, seq_len 256, batch 8, head_dim 32, vocab 4096, AdamW).

    .venv/bin/python bench/bench_train_cpu.py --config nanochat-cpu --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.config import TrainConfig  # noqa: E402
from llm.model import GPT, GPTConfig  # noqa: E402
from llm.train.optim import build_optimizers  # noqa: E402

CONFIGS = {
    "nanochat-cpu": dict(model=dict(depth=4, aspect_ratio=64, head_dim=128, seq_len=1024, vocab_size=65536),
                         train=dict(device_batch_size=1, total_batch_tokens=1024, optimizer="muon", lr=0.02,
                                    embedding_lr=0.2, unembedding_lr=0.004)),
    "tiny": dict(model=dict(depth=2, aspect_ratio=64, head_dim=32, seq_len=256, vocab_size=4096),
                 train=dict(device_batch_size=8, total_batch_tokens=4096, optimizer="adamw", lr=0.006)),
}


def write_shards(root: Path, vocab: int, n_tokens: int, seed: int = 0) -> Path:
    """Random documents (lengths 200..3000) in the token-shard format, enough for the whole bench."""
    rng = np.random.default_rng(seed)
    meta = {"dtype": "uint16" if vocab <= 65536 else "uint32", "vocab_size": vocab, "bos_id": 0, "splits": {}}
    for split, total in (("train", n_tokens), ("val", 200_000)):
        (root / split).mkdir(parents=True, exist_ok=True)
        lens = []
        while sum(lens) < total:
            lens.append(int(rng.integers(200, 3000)))
        toks = rng.integers(1, vocab, size=sum(lens), dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
        toks[starts] = 0
        toks.astype(meta["dtype"]).tofile(root / split / "shard_00000.bin")
        np.save(root / split / "shard_00000.idx.npy", starts)
        meta["splits"][split] = {"tokens": int(sum(lens)), "docs": len(lens), "shards": [f"{split}/shard_00000.bin"]}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def reference(cfg: dict, steps: int, warmup: int) -> dict:
    """The plain loop. Returns steady-state tokens/s over steps after ``warmup``."""
    mc = GPTConfig(**cfg["model"])
    tc = TrainConfig(**cfg["train"])
    torch.manual_seed(0)
    model = GPT(mc)
    opt = build_optimizers(model, tc)
    accum = tc.total_batch_tokens // (tc.device_batch_size * mc.seq_len)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, mc.vocab_size, (tc.device_batch_size, mc.seq_len + 1), generator=g) for _ in range(8)]
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for m in range(accum):
            b = data[(step * accum + m) % len(data)]
            loss = model(b[:, :-1], b[:, 1:])
            (loss / accum).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    steady = times[warmup:]
    return {"tokens_per_s": tc.total_batch_tokens * len(steady) / sum(steady), "steps": steps,
            "sec_per_step": sum(steady) / len(steady), "flops_per_token": model.flops_per_token()}


def kiln(cfg: dict, steps: int, warmup: int, ckpt_every: int, work: Path) -> dict:
    from llm.train.stages import launch_training

    mc = GPTConfig(**cfg["model"])
    tc = TrainConfig(**{**cfg["train"], "device": "cpu", "steps": steps, "log_every": warmup, "eval_every": 0,
                        "eval_tokens": mc.seq_len * cfg["train"]["device_batch_size"], "ckpt_every": ckpt_every,
                        "sample_prompts": [], "warmup_steps": 0})
    tokens = write_shards(work / "tokens", mc.vocab_size, n_tokens=max(2_000_000, 2 * steps * tc.total_batch_tokens))
    t0 = time.time()
    summary = launch_training(stage="bench", model_config=mc.to_dict(), train_config=tc, loader_kind="pretrain",
                              loader_spec={"uri": str(tokens)}, out_dir=work / "out", progress=False, nproc=1,
                              on_line=lambda line: None)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "tokens_per_s" in r and r["step"] > warmup]
    # interval-weighted mean: every interval after warm-up has log_every steps
    tps = len(steady) / sum(1.0 / r["tokens_per_s"] for r in steady)
    return {"tokens_per_s": tps, "steps": steps, "process_wall_s": wall, "train_wall_s": summary["wall_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="nanochat-cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ckpt-every", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = CONFIGS[args.config]
    print(f"config {args.config}: {cfg} | threads {torch.get_num_threads()} | torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ref1 = reference(cfg, args.steps, args.warmup)
        print(f"reference (plain loop)   {ref1['tokens_per_s']:>10,.0f} tokens/s", flush=True)
        ours = kiln(cfg, args.steps, args.warmup, args.ckpt_every, Path(tmp))
        print(f"kiln trainer             {ours['tokens_per_s']:>10,.0f} tokens/s "
              f"(process wall {ours['process_wall_s']:.1f}s incl. startup)", flush=True)
        ref2 = reference(cfg, args.steps, args.warmup)  # again: the box is shared, bracket the measurement
        print(f"reference (plain loop)   {ref2['tokens_per_s']:>10,.0f} tokens/s", flush=True)
    ref_tps = (ref1["tokens_per_s"] + ref2["tokens_per_s"]) / 2
    ratio = ours["tokens_per_s"] / ref_tps
    gflops = ours["tokens_per_s"] * ref1["flops_per_token"] / 1e9
    print(f"RATIO kiln/reference = {ratio:.3f}  (kiln {ours['tokens_per_s']:,.0f} vs reference mean {ref_tps:,.0f} "
          f"tokens/s; kiln achieves {gflops:.1f} GFLOP/s by the 6N+attention count)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
