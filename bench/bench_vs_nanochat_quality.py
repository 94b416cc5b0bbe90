"""Model quality at equal compute: nanochat HEAD's own model + optimizer vs Kiln's, on the same batches.

Both sides see exactly the same token batches (packed once by Kiln's pretrain loader from a tokenize stage's
shards, e.g. the tiny pipeline's) in the same order, the same number of optimizer steps and the same
LR-multiplier schedule (nanochat base_train's trapezoid by default: 40 warmup steps, linear warmdown over
the last 65 %, to 5 %). Each side keeps its own model, initialisation, optimizer, LRs and per-step
hyper-parameter schedules:

* **nanochat** — ``nanochat.gpt.GPT`` and ``GPT.setup_optimizer`` (``MuonAdamW``) imported from the checkout
  given as ``--nanochat DIR`` (never copied). LRs, weight decay, the Muon momentum schedule and the weight
  decay schedule are set the way ``scripts/base_train.py`` sets them for the given depth and batch
  (``--nanochat-scaling base_train``: its √(B/B_ref) LR scaling and T_epoch weight-decay scaling;
  ``none``: its unscaled defaults).
* **kiln** — ``llm.model.GPT`` and ``llm.train.optim.build_optimizers`` from a Kiln config (``--kiln-preset``,
  default: the config defaults, no preset) with ``--kiln-set a.b=c`` overrides, and the trainer's step
  (gradient clipping, ``Optimizers.set_step``).

Both are scored on the same held-out documents (the tokenize stage's val split, packed the same way)
with ``llm.eval.loss.evaluate_loss``: mean loss per token and bits per byte. Run on CPU in fp32.

    python bench/bench_vs_nanochat_quality.py --tokens artifacts/tokenize/<key> --steps 200 --seq-len 512
    python bench/bench_vs_nanochat_quality.py --tokens ... --only kiln --kiln-set model.value_embeds=true

nanochat's compiled optimizer kernels run eagerly (the functions its ``@torch.compile`` wraps: the same math,
no compile wait on 2 cores) unless ``--compile``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from nanochat_checkout import HOW_TO_GET, find_nanochat  # noqa: E402

from llm.config import KilnConfig, load_config  # noqa: E402
from llm.eval.loss import evaluate_loss  # noqa: E402
from llm.model import GPT, GPTConfig  # noqa: E402
from llm.train.loaders import PretrainLoader  # noqa: E402
from llm.train.optim import build_optimizers, lr_multiplier  # noqa: E402

# ------------------------------------------------------------------ data
def make_batches(tokens: Path, B: int, T: int, steps: int, val_tokens: int, seed: int):
    """``steps`` training batches and the held-out batches, packed once so both sides see the same."""
    loader = PretrainLoader({"uri": str(tokens)}, batch_size=B, seq_len=T, rank=0, world_size=1, seed=seed)
    train = [loader.next_batch() for _ in range(steps)]
    val = list(loader.val_batches(val_tokens))
    return train, val


def token_bytes_for(tokens: Path, arg: str | None):
    """The tokenizer's bytes-per-token table (for bits per byte), from --tokenizer or meta.json's path."""
    import numpy as np

    meta = json.loads((tokens / "meta.json").read_text())
    cands = [Path(arg)] if arg else []
    tok = Path(meta.get("tokenizer", ""))
    cands += [tok, tokens.parent.parent / "tokenizer" / tok.name]
    for c in cands:
        if (c / "token_bytes.npy").is_file():
            return np.load(c / "token_bytes.npy"), int(meta["vocab_size"])
    raise SystemExit(f"no token_bytes.npy for {tokens} (looked in {', '.join(map(str, cands))}); pass --tokenizer DIR")


# ------------------------------------------------------------------ nanochat side
class NanochatScorer(torch.nn.Module):
    """Adapts nanochat's ``forward(idx, targets, loss_reduction=...)`` to ``evaluate_loss``'s call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y=None, reduction="mean"):
        out = self.model(x, y, loss_reduction=reduction)
        return out.view(x.shape) if reduction == "none" else out


def nanochat_side(ndir: Path, args, vocab: int) -> tuple[torch.nn.Module, Callable[[int, int], None], dict]:
    """nanochat's GPT + MuonAdamW exactly as base_train builds them; returns (model, per-step hook, info)."""
    sys.path.insert(0, str(ndir))
    import nanochat.optim as noptim
    from nanochat.gpt import GPT as NGPT, GPTConfig as NConfig

    if not args.compile:  # run its @torch.compile'd step kernels as the plain functions they wrap (same math)
        for name in ("adamw_step_fused", "muon_step_fused"):
            setattr(noptim, name, getattr(noptim, name).__wrapped__)

    def meta_model(depth: int):
        dim = -(-depth * args.aspect_ratio // args.head_dim) * args.head_dim
        cfg = NConfig(sequence_len=args.seq_len, vocab_size=vocab, n_layer=depth, n_head=dim // args.head_dim,
                      n_kv_head=dim // args.head_dim, n_embd=dim, window_pattern=args.nanochat_window_pattern)
        with torch.device("meta"):
            return NGPT(cfg)

    def scaling_params(m) -> int:  # base_train: transformer matrices + lm_head
        c = m.num_scaling_params()
        return c["transformer_matrices"] + c["lm_head"]

    model = meta_model(args.depth)
    model.to_empty(device="cpu")
    torch.manual_seed(args.seed)
    model.init_weights()
    B_tok, ratio, b_ref = args.batch * args.seq_len, 12.0, 2 ** 19
    target = ratio * scaling_params(model)
    d_ref = ratio * scaling_params(meta_model(12))
    lr_s = math.sqrt(B_tok / b_ref) if args.nanochat_scaling == "base_train" else 1.0
    wd = 0.28 * (math.sqrt(B_tok / b_ref) * d_ref / target if args.nanochat_scaling == "base_train" else 1.0)
    opt = model.setup_optimizer(unembedding_lr=0.008 * lr_s, embedding_lr=0.3 * lr_s, scalar_lr=0.5 * lr_s,
                                matrix_lr=0.02 * lr_s, weight_decay=wd)
    n, wdown = args.steps, round(0.65 * args.steps)

    def hook(step: int, steps: int) -> None:  # base_train's per-step Muon momentum and weight decay
        mult = schedule(step, steps, args)
        if step < 400:
            mom = 0.85 + (0.97 - 0.85) * step / 400
        else:
            mom = 0.97
        if step >= n - wdown:
            mom = 0.97 + (0.90 - 0.97) * (step - (n - wdown)) / wdown
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * mult
            if g["kind"] == "muon":
                g["momentum"], g["weight_decay"] = mom, wd * 0.5 * (1 + math.cos(math.pi * step / n))

    info = {"lr_scale": lr_s, "weight_decay": wd, "params": sum(p.numel() for p in model.parameters()),
            "window_pattern": args.nanochat_window_pattern, "scaling": args.nanochat_scaling}
    return model, lambda x, y, step: _nano_step(model, opt, hook, x, y, step, args.steps), info


def _nano_step(model, opt, hook, x, y, step, steps) -> float:
    hook(step, steps)
    loss = model(x, y)
    loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


# ------------------------------------------------------------------ kiln side
def kiln_config(args) -> KilnConfig:
    shape = [f"model.depth={args.depth}", f"model.seq_len={args.seq_len}", f"model.head_dim={args.head_dim}",
             f"model.aspect_ratio={args.aspect_ratio}", "pretrain.device=cpu", "pretrain.nproc=1",
             f"pretrain.device_batch_size={args.batch}", f"pretrain.total_batch_tokens={args.batch * args.seq_len}",
             f"pretrain.steps={args.steps}",
             # the shared LR schedule, so Kiln's own per-step schedules (momentum) see the same warmdown
             "pretrain.schedule=linear", f"pretrain.warmup_steps={args.warmup_steps}",
             f"pretrain.warmdown_frac={args.warmdown_frac}", f"pretrain.min_lr_frac={args.final_lr_frac}"]
    if args.kiln_preset == "none":  # the config defaults: an empty preset file
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            empty = Path(tmp) / "defaults.yaml"
            empty.write_text("{}\n")
            return load_config(str(empty), shape + list(args.kiln_set))
    return load_config(args.kiln_preset, shape + list(args.kiln_set))


def kiln_side(args, vocab: int):
    cfg = kiln_config(args)
    mcfg = GPTConfig.from_model_config(cfg.model, vocab)
    with torch.device("meta"):
        model = GPT(mcfg)
    model.to_empty(device="cpu")
    torch.manual_seed(args.seed)
    model.init_weights()
    tr = cfg.pretrain
    if tr.depth_scaling:
        # Both sides train on the bench's own batches, so a rule that picks the batch cannot apply here.
        raise SystemExit("bench_vs_nanochat_quality.py: pretrain.depth_scaling sets the batch size; this bench "
                         "fixes it (--batch, --seq-len) for both sides. Use --nanochat-scaling to compare the rules.")
    opt = build_optimizers(model, tr)
    clip = tr.grad_clip if tr.grad_clip and tr.grad_clip > 0 else float("inf")

    def step_fn(x, y, step):
        opt.set_lr_multiplier(schedule(step, args.steps, args))
        if hasattr(opt, "set_step"):
            opt.set_step(step, args.steps)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    info = {"params": model.num_params(), "model": {k: v for k, v in cfg.model.model_dump().items()},
            "train": {k: getattr(tr, k) for k in ("optimizer", "lr", "embedding_lr", "unembedding_lr",
                                                  "weight_decay", "beta1", "beta2", "grad_clip")}}
    return model, step_fn, info


# ------------------------------------------------------------------ loop
def schedule(step: int, steps: int, args) -> float:
    """The LR multiplier both sides share (Kiln's implementation of the linear trapezoid)."""
    return lr_multiplier(step, steps, schedule="linear", warmup_steps=args.warmup_steps,
                         warmdown_frac=args.warmdown_frac, min_lr_frac=args.final_lr_frac)


def train_and_score(name: str, model, step_fn, train, val, token_bytes, scorer=None) -> dict[str, Any]:
    t0 = time.perf_counter()
    losses = []
    for i, (x, y) in enumerate(train):
        losses.append(step_fn(x, y, i))
        if (i + 1) % 50 == 0:
            print(f"  {name} step {i + 1}/{len(train)} loss {sum(losses[-10:]) / 10:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    train_s = time.perf_counter() - t0
    sums = evaluate_loss(scorer or model, val, token_bytes=token_bytes)
    return {"val_loss": sums.mean_loss, "val_bpb": sums.bpb, "val_tokens": int(sums.tokens),
            "final_train_loss": sum(losses[-10:]) / min(10, len(losses)), "train_s": round(train_s, 1),
            "tok_per_s": round(sum(x.numel() for x, _ in train) / train_s)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanochat", default=None, help="nanochat checkout (default $NANOCHAT_DIR or ../nanochat)")
    ap.add_argument("--tokens", required=False, help="a tokenize stage output dir (meta.json, train/, val/)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer stage dir with token_bytes.npy (default: from meta.json)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--val-tokens", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-steps", type=int, default=40)
    ap.add_argument("--warmdown-frac", type=float, default=0.65)
    ap.add_argument("--final-lr-frac", type=float, default=0.05)
    ap.add_argument("--kiln-preset", default="none", help="Kiln preset for the Kiln side ('none': config defaults)")
    ap.add_argument("--kiln-set", action="append", default=[], help="Kiln override a.b=c (repeatable)")
    ap.add_argument("--only", choices=["both", "kiln", "nanochat"], default="both")
    ap.add_argument("--nanochat-scaling", choices=["base_train", "none"], default="base_train")
    ap.add_argument("--nanochat-window-pattern", default="SSSL")
    ap.add_argument("--compile", action="store_true", help="let nanochat's optimizer kernels compile")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ndir = find_nanochat(args.nanochat)
    if args.only != "kiln" and ndir is None:
        print(HOW_TO_GET)
        return 0
    if not args.tokens:
        print("pass --tokens <tokenize stage output> (e.g. `kiln run --preset tiny` then artifacts/tokenize/<key>)")
        return 0
    tokens = Path(args.tokens)
    token_bytes, vocab = token_bytes_for(tokens, args.tokenizer)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load = os.getloadavg()[0]
    train, val = make_batches(tokens, args.batch, args.seq_len, args.steps, args.val_tokens, args.seed)
    print(f"load {load:.2f}; {args.steps} steps × {args.batch}×{args.seq_len} = "
          f"{args.steps * args.batch * args.seq_len:,} tokens; val {sum(x.numel() for x, _ in val):,} tokens")
    out: dict[str, Any] = {"args": vars(args), "load_before": load}
    if args.only != "kiln":
        model, step_fn, info = nanochat_side(ndir, args, vocab)
        commit = subprocess.run(["git", "-C", str(ndir), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        out["nanochat"] = {**info, "commit": commit,
                           **train_and_score("nanochat", model, step_fn, train, val, token_bytes, NanochatScorer(model))}
        print("nanochat", json.dumps(out["nanochat"]), flush=True)
    if args.only != "nanochat":
        model, step_fn, info = kiln_side(args, vocab)
        out["kiln"] = {**info, **train_and_score("kiln", model, step_fn, train, val, token_bytes)}
        print("kiln", json.dumps({k: v for k, v in out["kiln"].items() if k != "model"}), flush=True)
    out["load_after"] = os.getloadavg()[0]
    if "kiln" in out and "nanochat" in out:
        d = out["kiln"]["val_loss"] - out["nanochat"]["val_loss"]
        print(f"val loss: nanochat {out['nanochat']['val_loss']:.4f}  kiln {out['kiln']['val_loss']:.4f}  "
              f"(kiln − nanochat = {d:+.4f} nats); bpb {out['nanochat']['val_bpb']:.4f} vs {out['kiln']['val_bpb']:.4f}")
    print(f"load after {out['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
