"""GPU training throughput and MFU of the Kiln trainer for the d12 and d20 presets (bf16, torch.compile).

Runs the real path (``launch_training`` → torchrun → ``llm.train.trainer`` → pretrain loader on memmapped
shards) for ``--steps`` optimizer steps on synthetic random-token shards (vocab 65,536, as in the
presets) and reports the trainer's steady-state tokens/s and MFU from its metrics.jsonl (intervals
after ``--warmup`` steps, so compilation is excluded). MFU = flops_per_token × tokens/s / (peak bf16
FLOP/s × GPUs), with the 6N + 12·L·H·hd·T count of ``llm.model`` and the peak table in ``llm.train.plan``.
The goal from the issue is ≥ 45% MFU on one H100 for d20.

Reference in the same run: the plain loop of ``bench_train_cpu.reference`` (same model, same optimizer,
in-memory batches, bf16 autocast, compiled), so the ratio isolates the trainer's own overhead.

    .venv/bin/python bench/bench_train_gpu.py --preset d20 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_train_cpu import write_shards  # noqa: E402

from llm.config import load_config  # noqa: E402
from llm.model import GPT, GPTConfig  # noqa: E402
from llm.train.optim import build_optimizers  # noqa: E402
from llm.train.plan import peak_flops  # noqa: E402


def reference(mc: GPTConfig, tc, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = GPT(mc).cuda()
    opt = build_optimizers(model, tc, fused=True)
    fwd = torch.compile(model) if tc.compile else model
    accum = tc.total_batch_tokens // (tc.device_batch_size * mc.seq_len)
    b = torch.randint(0, mc.vocab_size, (tc.device_batch_size, mc.seq_len + 1), device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(b[:, :-1], b[:, 1:])
            (loss / accum).backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[warmup:]
    return tc.total_batch_tokens * len(steady) / sum(steady)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="d12")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--total-batch-tokens", type=int, default=None, help="default: the preset's, scaled to 1 GPU")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this bench needs a GPU", file=sys.stderr)
        return 2
    cfg = load_config(args.preset)
    mc = GPTConfig.from_model_config(cfg.model, 65536)
    tc = cfg.pretrain.model_copy(update={"device": "cuda", "steps": args.steps, "log_every": args.warmup,
                                         "eval_every": 0, "ckpt_every": 10**9, "sample_prompts": [],
                                         "eval_tokens": cfg.pretrain.device_batch_size * mc.seq_len, "nproc": 1})
    if args.total_batch_tokens:
        tc = tc.model_copy(update={"total_batch_tokens": args.total_batch_tokens})
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    with torch.device("meta"):
        fpt = GPT(mc).flops_per_token()
    print(f"{args.preset} on {name} (peak {peak:.3g} FLOP/s): {mc.to_dict()} | batch {tc.total_batch_tokens}", flush=True)
    ref = reference(mc, tc, min(args.steps, 20), min(args.warmup, 5))
    print(f"reference loop  {ref:,.0f} tokens/s  MFU {fpt * ref / peak:.1%}", flush=True)
    from llm.train.stages import launch_training

    with tempfile.TemporaryDirectory() as tmp:
        tokens = write_shards(Path(tmp) / "tokens", 65536, n_tokens=(args.steps + 2) * tc.total_batch_tokens)
        launch_training(stage="bench", model_config=mc.to_dict(), train_config=tc, loader_kind="pretrain",
                        loader_spec={"uri": str(tokens)}, out_dir=Path(tmp) / "out", progress=False, nproc=1,
                        on_line=print)
        rows = [json.loads(x) for x in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "tokens_per_s" in r and r["step"] > args.warmup]
    tps = len(steady) / sum(1.0 / r["tokens_per_s"] for r in steady)
    print(f"kiln trainer    {tps:,.0f} tokens/s  MFU {fpt * tps / peak:.1%}  "
          f"(mem {max(r.get('gpu_mem_reserved_gb', 0) for r in rows):.1f} GiB reserved)")
    print(f"RATIO kiln/reference = {tps / ref:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
