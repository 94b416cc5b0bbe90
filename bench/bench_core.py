"""CORE eval throughput: Kiln's default path vs the plain one-example-at-a-time loop.

Both runs score the same (randomly initialised) GPT on the same tasks and examples with Kiln's
evaluator; the only difference is how the sequences reach the model:

- reference (``per_example=True``): one full-sequence forward per example (its 2–4 choice
  sequences), as nanochat's loop does;
- kiln (default): each example's shared prompt once into a KV cache, its continuations together
  on top, logits only at scored tokens (see llm/eval/core.py). ``--batch-tokens`` applies only
  to the packed full-sequence path of non-model scorers.

For the comparison against nanochat's own evaluator see bench_vs_nanochat_core.py.

Prints examples/s for both, the speed-up, and checks the per-task accuracies are identical.

    python bench/bench_core.py                       # CPU, tiny model, 20 tasks x 16 examples
    python bench/bench_core.py --device cuda --depth 12 --max-per-task 200 --batch-tokens 65536
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_tokenizer(mirror: Path, vocab: int):
    """A BPE trained on a slice of the offline pretraining kit (seconds), so token lengths are realistic."""
    import pyarrow.parquet as pq

    from llm.data.tokenizer import train_tokenizer

    pf = pq.ParquetFile(mirror / "pretrain" / "shard_00000.parquet")
    texts = next(pf.iter_batches(batch_size=800, columns=["text"])).column("text").to_pylist()
    tok, _ = train_tokenizer(texts, vocab)
    return tok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mirror", default=os.environ.get("KILN_DATA_MIRROR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="training context; eval crops at the 4x rotary table")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-per-task", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--tasks", default="", help="comma-separated task labels (default: all with data)")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    import torch

    from llm.eval.bundle import load_bundle
    from llm.eval.core import evaluate_core, model_scorer
    from llm.model import GPT, GPTConfig

    t0 = time.time()
    tok = bench_tokenizer(Path(args.mirror), args.vocab)
    print(f"tokenizer: vocab {tok.vocab_size} trained in {time.time() - t0:.1f}s")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, depth=args.depth, aspect_ratio=args.aspect_ratio,
                    head_dim=args.head_dim, seq_len=args.seq_len)
    model = GPT(cfg).to(args.device).eval()
    print(f"model: depth {cfg.depth}, dim {cfg.model_dim}, {model.num_params() / 1e6:.2f}M params on {args.device}"
          f" (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    bundle = load_bundle(str(Path(args.mirror) / "core_eval"))
    tasks = [t for t in args.tasks.split(",") if t] or None
    scorer = model_scorer(model, args.device)
    max_len = int(model.rope_cos.shape[0])

    def go(per_example: bool):
        best = None
        for _ in range(args.repeats):
            r = evaluate_core(scorer, tok, bundle, max_per_task=args.max_per_task, batch_tokens=args.batch_tokens,
                              max_seq_len=max_len, per_example=per_example, tasks=tasks, device=args.device)
            best = r if best is None or r.seconds < best.seconds else best
        return best

    go(False) if args.device.startswith("cuda") else None  # warm up kernels / allocator on GPU
    ref = go(True)
    new = go(False)
    same = {k: t.accuracy for k, t in ref.tasks.items()} == {k: t.accuracy for k, t in new.tasks.items()}
    print(f"tasks: {ref.n_tasks} ({ref.label}), examples: {ref.examples}")
    print(f"one example at a time : {ref.examples / ref.seconds:8.1f} examples/s  ({ref.seconds:.2f}s)")
    print(f"shared-prompt path    : {new.examples / new.seconds:8.1f} examples/s  ({new.seconds:.2f}s, "
          f"batch_tokens={args.batch_tokens})")
    print(f"speed-up              : {ref.seconds / new.seconds:.2f}x")
    print(f"identical accuracies  : {same}  (CORE {ref.core:.4f} vs {new.core:.4f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
