"""Hand-made tokenizers, scorers and bundles with answers known in advance, for the eval tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte + 1); id 0 is BOS. Enough to check token bookkeeping."""

    bos_id = 0
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> np.ndarray:
        tb = np.ones(self.vocab_size, dtype=np.int32)
        tb[0] = 0
        return tb


def alphabet_scorer(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A "model" that expects the next letter of the alphabet: loss = |next - (cur + 1)|, argmax = cur + 1.

    Answers under it can be worked out by hand, and they depend on *which* positions are scored.
    """
    ids = ids.long()
    nxt = torch.roll(ids, -1, dims=1)
    losses = (nxt - ids - 1).abs().float()
    losses[:, -1] = float("nan")
    return losses, ids + 1


class OracleScorer:
    """Knows the gold token sequences: loss 0 while a row follows one of them, 10 once it leaves; argmax follows gold."""

    def __init__(self, gold_seqs: Iterable[list[int]]):
        self.next: dict[tuple[int, ...], set[int]] = {}
        for seq in gold_seqs:
            for t in range(len(seq) - 1):
                self.next.setdefault(tuple(seq[: t + 1]), set()).add(seq[t + 1])

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        losses = torch.full((b, t), 10.0)
        preds = torch.zeros((b, t), dtype=torch.long)
        rows = ids.tolist()
        for i, row in enumerate(rows):
            for p in range(t - 1):
                options = self.next.get(tuple(row[: p + 1]))
                if options is None:
                    break  # this row has left every gold sequence: 10 from here on
                preds[i, p] = min(options)
                losses[i, p] = 0.0 if row[p + 1] in options else 10.0
        losses[:, -1] = float("nan")
        return losses, preds


def gold_texts(task_type: str, rows: list[dict[str, Any]], delimiter: str) -> list[str]:
    """The text of the correct answer of each 0-shot row, written out independently of llm.eval.core."""
    if task_type == "multiple_choice":
        return [r["query"] + delimiter + r["choices"][r["gold"]] for r in rows]
    if task_type == "schema":
        return [r["context_options"][r["gold"]] + delimiter + r["continuation"] for r in rows]
    return [str(r["context"]).strip() + delimiter + r["continuation"] for r in rows]


def write_bundle(root: Path, tasks: list[dict[str, Any]], baselines: dict[str, float]) -> Path:
    """A bundle directory: tasks = [{label, type, shots, delimiter?, rows, category?}]; baselines in percent."""
    lines = ["icl_tasks:"]
    for t in tasks:
        uri = f"{t.get('category', 'misc')}/{t['label']}.jsonl"
        lines += ["-", f"  label: {t['label']}", f"  dataset_uri: {uri}", f"  num_fewshot: [{t.get('shots', 0)}]",
                  f"  icl_task_type: {t['type']}"]
        if "delimiter" in t:
            lines.append(f"  continuation_delimiter: {json.dumps(t['delimiter'])}")
        if t.get("rows") is not None:
            p = root / "eval_data" / uri
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps(r) + "\n" for r in t["rows"]))
    root.mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    meta = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    meta += [f"{k},x,x,0,0,{v},,d" for k, v in baselines.items()]
    (root / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    return root
