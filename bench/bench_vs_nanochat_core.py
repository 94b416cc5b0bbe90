"""CORE eval speed: Kiln's evaluator against nanochat HEAD's own, on the same Kiln model.

nanochat's ``nanochat/core_eval.py`` ``evaluate_task`` is imported from a checkout (``--nanochat DIR``)
and run on the same GPT, the same tokenizer and the same shuffled, capped task data as Kiln's
``llm.eval.core.evaluate_task``. nanochat's evaluator calls ``model(input_ids) -> logits`` and a
tokenizer ``tok(texts, prepend=bos)`` / ``tok.get_bos_token_id()``; the two thin adapters below give
it that interface over Kiln's model and tokenizer (no nanochat code is copied). Tasks are timed
one at a time, the two evaluators interleaved (A B, then B A) so machine load hits both alike.
Per-task accuracies must be identical; the script exits 1 when they are not.

    python bench/bench_vs_nanochat_core.py --nanochat ../nanochat               # d4, 20 tasks x 32
    python bench/bench_vs_nanochat_core.py --nanochat ../nanochat --nproc 2     # + Kiln on 2 gloo ranks

nanochat checkout: ``git clone https://github.com/karpathy/nanochat && git -C nanochat checkout 92d63d4``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from nanochat_checkout import GET_NANOCHAT, find_nanochat  # noqa: E402


class NanoTokenizer:
    """nanochat's tokenizer calling convention over a Kiln tokenizer."""

    def __init__(self, tok: Any):
        self.tok = tok

    def get_bos_token_id(self) -> int:
        return self.tok.bos_id

    def __call__(self, texts: Any, prepend: int | None = None) -> Any:
        single = isinstance(texts, str)
        rows = self.tok.encode_batch([texts] if single else list(texts))
        if prepend is not None:
            rows = [[prepend, *r] for r in rows]
        return rows[0] if single else rows


class NanoModel:
    """``model(ids) -> logits`` plus the ``max_seq_len`` nanochat crops at, over a Kiln GPT."""

    def __init__(self, model: Any, max_seq_len: int):
        self.model, self.max_seq_len = model, max_seq_len

    def __call__(self, ids: Any) -> Any:
        return self.model(ids)


def bench_tokenizer(mirror: Path, vocab: int) -> Any:
    """A BPE trained on a slice of the offline pretraining kit, so token lengths are realistic."""
    import pyarrow.parquet as pq

    from llm.data.tokenizer import train_tokenizer

    pf = pq.ParquetFile(mirror / "pretrain" / "shard_00000.parquet")
    texts = next(pf.iter_batches(batch_size=800, columns=["text"])).column("text").to_pylist()
    return train_tokenizer(texts, vocab)[0]


def build_model(args: argparse.Namespace, vocab: int) -> Any:
    """A Kiln checkpoint (--checkpoint) or a seeded random-init GPT of --depth."""
    import torch

    from llm.model import GPT, GPTConfig

    if args.checkpoint:
        from llm.checkpoint import load_model

        return load_model(args.checkpoint, device="cpu")[0].eval()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, depth=args.depth, aspect_ratio=64, head_dim=args.head_dim, seq_len=args.seq_len)
    return GPT(cfg).eval()


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_pair(nano_eval: Any, model: Any, tok: Any, bundle: Any, args: argparse.Namespace) -> tuple[dict, dict]:
    """Per task: (nanochat accuracy, seconds) and (Kiln accuracy, seconds), interleaved A B / B A."""
    import torch

    from llm.eval.bundle import load_task_data
    from llm.eval.core import evaluate_task, model_scorer, prepare_data

    max_len = int(model.rope_cos.shape[0])
    nano_model, nano_tok = NanoModel(model, max_len), NanoTokenizer(tok)
    scorer = model_scorer(model, "cpu")
    nano, kiln = {}, {}
    chosen = [t for t in bundle.tasks if not args.tasks or t.label in args.tasks.split(",")]
    for i, task in enumerate(chosen):
        data = prepare_data(load_task_data(bundle, task), args.max_per_task)
        meta = {"task_type": task.task_type, "num_fewshot": task.num_fewshot,
                "continuation_delimiter": task.delimiter}
        run_n = lambda: timed(lambda: nano_eval(nano_model, nano_tok, data, "cpu", meta))  # noqa: E731
        run_k = lambda: timed(lambda: evaluate_task(scorer, tok, task, data, max_seq_len=max_len,  # noqa: E731
                                                    batch_tokens=args.batch_tokens).accuracy)
        with torch.inference_mode():
            if i % 2 == 0:
                nano[task.label], kiln[task.label] = run_n(), run_k()
            else:
                kiln[task.label], nano[task.label] = run_k(), run_n()
        same = round(nano[task.label][0] * len(data)) == round(kiln[task.label][0] * len(data))
        print(f"  {task.label:<34} n={len(data):<4} nanochat {nano[task.label][0]:.4f} {nano[task.label][1]:6.2f}s"
              f"   kiln {kiln[task.label][0]:.4f} {kiln[task.label][1]:6.2f}s   {'same' if same else 'DIFFERENT'}",
              flush=True)
    return nano, kiln


def kiln_ranks(args: argparse.Namespace, nproc: int) -> float:
    """Wall seconds of Kiln's evaluate_core over the same tasks on ``nproc`` gloo ranks (1 thread each)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, __file__, "--_rank-child", d, "--nproc", str(nproc)] + _child_args(args)
        subprocess.run(cmd, check=True)
        return float(Path(d, "eval_s").read_text())


def _child_args(args: argparse.Namespace) -> list[str]:
    out = ["--mirror", args.mirror, "--depth", str(args.depth), "--head-dim", str(args.head_dim),
           "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--max-per-task", str(args.max_per_task),
           "--batch-tokens", str(args.batch_tokens)]
    out += ["--tasks", args.tasks] if args.tasks else []
    return out + (["--checkpoint", args.checkpoint] if args.checkpoint else [])


def _rank_main(rank: int, args: argparse.Namespace, world: int) -> None:
    import torch
    import torch.distributed as dist

    from llm.eval.bundle import load_bundle
    from llm.eval.core import evaluate_core, model_scorer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args._rank_child}/rdv", rank=rank, world_size=world)
    tok = bench_tokenizer(Path(args.mirror), args.vocab)
    model = build_model(args, tok.vocab_size)
    bundle = load_bundle(str(Path(args.mirror) / "core_eval"))
    tasks = args.tasks.split(",") if args.tasks else None
    dist.barrier()  # time the evaluation only, not start-up
    t0 = time.perf_counter()
    evaluate_core(model_scorer(model), tok, bundle, max_per_task=args.max_per_task, tasks=tasks,
                  batch_tokens=args.batch_tokens, max_seq_len=int(model.rope_cos.shape[0]))
    dist.barrier()
    if rank == 0:
        Path(args._rank_child, "eval_s").write_text(str(time.perf_counter() - t0))
    dist.destroy_process_group()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanochat", default=None, help="nanochat checkout (default $NANOCHAT_DIR or ../nanochat)")
    p.add_argument("--mirror", default=os.environ.get("KILN_DATA_MIRROR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--checkpoint", default="", help="a Kiln checkpoint to score instead of a random-init GPT")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512, help="training context; both crop at the 4x rotary table")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-per-task", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--tasks", default="", help="comma-separated task labels (default: all with data)")
    p.add_argument("--nproc", type=int, default=1, help=">1: also time Kiln on 1 vs N gloo ranks (1 thread each)")
    p.add_argument("--ranks-only", action="store_true", help="with --nproc: only the 1 vs N ranks timing")
    p.add_argument("--_rank-child", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = parse()
    if args._rank_child:
        import torch.multiprocessing as mp

        mp.spawn(_rank_main, args=(args, args.nproc), nprocs=args.nproc, join=True)
        return 0
    if args.ranks_only:
        return ranks_report(args)
    root = find_nanochat(args.nanochat)
    if root is None:
        print(f"nanochat checkout not found (--nanochat DIR, $NANOCHAT_DIR or ../nanochat). Get it with:\n  {GET_NANOCHAT}")
        return 0
    sys.path.insert(0, str(root))
    import torch
    from nanochat.core_eval import evaluate_task as nano_eval

    from llm.eval.bundle import load_bundle

    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    tok = bench_tokenizer(Path(args.mirror), args.vocab)
    model = build_model(args, tok.vocab_size)
    print(f"nanochat {root} @ {commit or '?'}; model depth {model.config.depth} dim {model.config.model_dim} "
          f"vocab {model.config.vocab_size} ({model.num_params() / 1e6:.2f}M params), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    bundle = load_bundle(str(Path(args.mirror) / "core_eval"))
    nano, kiln = run_pair(nano_eval, model, tok, bundle, args)
    return report(nano, kiln, args)


def report(nano: dict, kiln: dict, args: argparse.Namespace) -> int:
    n_ex = args.max_per_task * len(nano)  # every kit task has more rows than the cap
    tn, tk = sum(s for _, s in nano.values()), sum(s for _, s in kiln.values())
    same = all(round(nano[k][0] * args.max_per_task) == round(kiln[k][0] * args.max_per_task) for k in nano)
    print("uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"tasks {len(nano)} x {args.max_per_task} examples = {n_ex}")
    print(f"nanochat core_eval.evaluate_task : {n_ex / tn:8.2f} ex/s ({tn:.2f}s)")
    print(f"kiln llm.eval.core.evaluate_task : {n_ex / tk:8.2f} ex/s ({tk:.2f}s)")
    print(f"ratio kiln/nanochat              : {tn / tk:.2f}x")
    print(f"identical per-task accuracies    : {same}")
    if args.nproc > 1:
        ranks_report(args, n_ex)
    return 0 if same else 1


def ranks_report(args: argparse.Namespace, n_ex: int | None = None) -> int:
    """Kiln's evaluate_core on 1 rank, then on --nproc gloo ranks, then 1 again (A B A), 1 thread each."""
    from llm.eval.bundle import load_bundle

    if n_ex is None:
        bundle = load_bundle(str(Path(args.mirror) / "core_eval"))
        n_ex = args.max_per_task * len([t for t in bundle.tasks if not args.tasks or t.label in args.tasks.split(",")])
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    one_a, many, one_b = kiln_ranks(args, 1), kiln_ranks(args, args.nproc), kiln_ranks(args, 1)
    one = (one_a + one_b) / 2
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"kiln evaluate_core, 1 rank x 1 thread  : {n_ex / one:8.2f} ex/s ({one_a:.2f}s, {one_b:.2f}s)")
    print(f"kiln evaluate_core, {args.nproc} ranks x 1 thread : {n_ex / many:8.2f} ex/s ({many:.2f}s), "
          f"{one / many:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
