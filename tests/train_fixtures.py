"""Tiny, learnable token-shard fixtures in the HELPERS.md shard format, and trainer job builders.

The documents come from a fixed random first-order Markov chain over a small vocabulary, so a tiny
model's loss falls quickly and measurably, and everything is deterministic from the seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 64
BOS = 0


def write_token_shards(root: Path, *, n_docs: int = 400, val_docs: int = 40, shards: int = 2, seed: int = 0,
                       min_len: int = 8, max_len: int = 120, vocab: int = VOCAB) -> Path:
    """Write ``meta.json`` + ``{train,val}/shard_XXXXX.bin`` + ``.idx.npy`` (every doc starts with BOS)."""
    rng = np.random.default_rng(seed)
    # Sparse transition table: each token has 3 likely successors -> low achievable loss.
    nxt = rng.integers(1, vocab, size=(vocab, 3))
    root.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"dtype": "uint16", "vocab_size": vocab, "bos_id": BOS, "splits": {}}
    for split, count, n_sh in (("train", n_docs, shards), ("val", val_docs, 1)):
        (root / split).mkdir(exist_ok=True)
        names, total = [], 0
        per = [count // n_sh + (1 if i < count % n_sh else 0) for i in range(n_sh)]
        for si, nd in enumerate(per):
            toks, starts = [], []
            pos = 0
            for _ in range(nd):
                n = int(rng.integers(min_len, max_len))
                doc = [BOS, int(rng.integers(1, vocab))]
                for _ in range(n - 2):
                    doc.append(int(nxt[doc[-1], rng.integers(0, 3)]))
                starts.append(pos)
                toks.extend(doc)
                pos += len(doc)
            name = f"shard_{si:05d}"
            np.asarray(toks, dtype=np.uint16).tofile(root / split / f"{name}.bin")
            np.save(root / split / f"{name}.idx.npy", np.asarray(starts, dtype=np.int64))
            names.append(f"{split}/{name}.bin")
            total += pos
        meta["splits"][split] = {"tokens": total, "docs": count, "shards": names}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def tiny_job(tokens: Path, out: Path, **train: Any) -> dict[str, Any]:
    """A trainer job for a ~100K-parameter model on the fixture data, CPU, no MLflow."""
    t = {"device": "cpu", "device_batch_size": 4, "total_batch_tokens": 4 * 32 * 2, "steps": 12, "optimizer": "adamw", "lr": 3e-3,
         "warmup_steps": 0, "schedule": "linear", "warmdown_frac": 0.3, "eval_every": 6, "eval_tokens": 512,
         "log_every": 2, "ckpt_every": 4, "keep_last": 2, "sample_prompts": []}
    t.update(train)
    return {
        "stage": "pretrain",
        "model": {"vocab_size": VOCAB, "depth": 2, "aspect_ratio": 32, "head_dim": 16, "n_kv_heads": None,
                  "seq_len": 32, "softcap": 15.0, "rope_base": 10000.0},
        "train": t,
        "loader": {"kind": "pretrain", "spec": {"uri": str(tokens)}},
        "tokenizer": None,
        "init_checkpoint": None,
        "out_dir": str(out),
        "resume": "auto",
        "upload_uri": None,
        "seed": 1234,
        "mlflow": {"enabled": False},
        "progress": False,
    }
