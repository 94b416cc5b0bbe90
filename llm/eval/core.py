"""CORE: the DCLM in-context-learning benchmark, scored the way nanochat scores it.

Every example becomes one or more token sequences (BOS + few-shot examples + the item), and
the model's per-position cross-entropy and argmax decide the answer:

- ``multiple_choice``: one sequence per choice. The choices share the prompt, so the
  continuation starts where the sequences stop agreeing (common token prefix); the choice
  with the lowest *mean* continuation loss is the prediction.
- ``schema``: one sequence per context option with the same continuation; the continuation
  is the common token suffix, and again the lowest mean loss wins.
- ``language_modeling``: the prompt with and without the continuation; correct only when the
  greedy (argmax) prediction equals every continuation token.

Few-shot examples are drawn per example with ``random.Random(1234 + idx)`` from the other
rows of the (shuffled, capped) task data, joined by a blank line, each as
``<context><delimiter><answer>``. Task data are shuffled with ``random.Random(1337)`` before the
``max_per_task`` cap. Accuracy is centered against the random baseline,
``(acc - b) / (1 - b)``, and CORE is the mean centered accuracy over the tasks evaluated.

What differs from nanochat's one-example-at-a-time loop is only speed, never which tokens are
scored or how:

- with a GPT (:class:`ModelScorer`), each example's *shared prompt* (the tokens all its sequences
  start with, up to the first scored position: BOS, the few-shot examples and the query) runs
  through the model once into a KV cache; all its continuations then run together on top of a
  copy of that cache, and the vocabulary projection runs only where tokens are scored. An MC
  example with four choices costs about one prompt instead of four, and no logits are
  computed for the few-shot tokens, which nothing reads;
- any other scorer (``ids -> (losses, argmax)``) gets full sequences, sorted by length and
  packed into right-padded batches of at most ``batch_tokens`` tokens (``per_example`` gives
  one batch per example, the plain baseline). Right padding never changes the scores of a
  causal model at the positions that are read.

Examples are strided across ranks and all-reduced.

The model is reached through a *scorer*: ``ids (B, T) -> (losses (B, T), argmax (B, T))``
with ``losses[:, t]`` the loss of predicting ``ids[:, t + 1]``. :func:`model_scorer` wraps a GPT;
tests plug in hand-made scorers with known answers.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llm.eval.bundle import Bundle, TaskSpec, load_task_data

Scorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


class TokenizerLike(Protocol):
    bos_id: int

    def encode(self, text: str) -> list[int]: ...


# --------------------------------------------------------------------------- scorers


@contextlib.contextmanager
def _lm_head_at(model: torch.nn.Module, index: tuple[torch.Tensor, torch.Tensor] | None):
    """Run ``model.lm_head`` only on the final hidden states at ``index`` = (rows, cols); none when None.

    Why: CORE reads the logits of a few continuation tokens per sequence, while the vocabulary
    projection (and the fp32 logits behind it) costs about as much as the whole d4 block stack
    per token. Selecting the hidden states before the projection keeps the model's own forward
    (every block, the final norm, the soft-cap) and drops the unread rows; the tests compare the
    result with full-sequence scoring.
    """

    def select(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x[:, :0] if index is None else x[index],) + tuple(args[1:])

    handle = model.lm_head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


class ModelScorer:
    """A GPT (``forward(idx, kv_cache=...)`` returning logits) as a scorer; bf16 autocast on CUDA, fp32 loss.

    Called on ``ids`` it is the plain full-sequence scorer (every position's loss and argmax).
    :meth:`score_shared` is the fast path :func:`score_requests` takes: an example's shared prompt
    runs once through the model into a KV cache, then all its continuations run together on top of
    it, with logits only where tokens are scored.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.model, self.device = model, torch.device(device)

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.model(ids)
        logits = logits.float()
        b, t, v = logits.shape
        targets = torch.roll(ids, shifts=-1, dims=1)
        losses = F.cross_entropy(logits.view(b * t, v), targets.view(b * t), reduction="none").view(b, t)
        losses[:, -1] = float("nan")  # no next token to predict at the last position
        return losses, logits.argmax(dim=-1)

    @torch.inference_mode()
    def score_rows(self, ids: np.ndarray, spans: Sequence[tuple[int, int, int]], cache: Any = None) -> "Scored":
        """(losses, argmax, targets) at positions [lo, hi) of row ``row`` for each (row, lo, hi) of ``spans``.

        Position t predicts ``ids[row, t + 1]``; the vocabulary projection runs at those positions only.
        """
        rows = np.concatenate([np.full(hi - lo, r) for r, lo, hi in spans]).astype(np.int64)
        cols = np.concatenate([np.arange(lo, hi) for _, lo, hi in spans]).astype(np.int64)
        targets = ids[rows, cols + 1]
        index = (torch.from_numpy(rows).to(self.device), torch.from_numpy(cols).to(self.device))
        with self._autocast(), _lm_head_at(self.model, index):
            logits = self.model(torch.from_numpy(ids).to(self.device), kv_cache=cache).float()
        losses = F.cross_entropy(logits, torch.from_numpy(targets).to(self.device), reduction="none")
        losses, preds = losses.cpu().numpy(), logits.argmax(dim=-1).cpu().numpy()
        bounds = np.cumsum([0] + [hi - lo for _, lo, hi in spans])
        return [(losses[a:b], preds[a:b], targets[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    @torch.inference_mode()
    def score_shared(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], pad_id: int,
                     spans: Sequence[tuple[int, int]]) -> "Scored":
        """(losses, argmax, targets) at suffix positions [lo, hi) of each ``prefix + suffix``.

        The prefix runs once at batch 1 (no logits) into a KV cache that every suffix row then
        continues from. Position t predicts suffix token t + 1, so spans end before their suffix does.
        """
        from llm.model import KVCache

        model, cfg = self.model, self.model.config
        ids = _right_padded(suffixes, pad_id)
        cache = None
        if prefix:
            dtype = torch.get_autocast_dtype("cuda") if self.device.type == "cuda" else model.lm_head.weight.dtype
            cache = KVCache(cfg.depth, 1, cfg.kv_heads, len(prefix), cfg.head_dim, self.device, dtype)
            with self._autocast(), _lm_head_at(model, None):
                model(torch.tensor([list(prefix)], device=self.device), kv_cache=cache)
            cache = cache.repeat(len(suffixes), ids.shape[1])
        return self.score_rows(ids, [(r, lo, hi) for r, (lo, hi) in enumerate(spans)], cache)


def _right_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    ids = np.full((len(seqs), max(len(x) for x in seqs)), pad_id, dtype=np.int64)
    for row, x in enumerate(seqs):
        ids[row, : len(x)] = x
    return ids


def model_scorer(model: torch.nn.Module, device: str | torch.device = "cpu") -> ModelScorer:
    """The scorer CORE uses for a GPT (see :class:`ModelScorer`)."""
    return ModelScorer(model, device)


# --------------------------------------------------------------------------- prompts


def fewshot_indices(idx: int, n: int, k: int) -> list[int]:
    """The few-shot rows for example ``idx``: ``k`` distinct other rows, deterministic in (idx, n, k).

    Same draws as sampling ``k`` from the list of all indices except ``idx``, without building it.
    """
    k = min(k, n - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(n - 1), k)
    return [j if j < idx else j + 1 for j in picks]


def render_prompts(task_type: str, item: dict[str, Any], delimiter: str, shots: Sequence[dict[str, Any]]) -> list[str]:
    """The texts to score for one item (see the module docstring for the three layouts)."""
    if task_type == "multiple_choice":
        head = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        head = "".join(f"{str(s['context']).strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
        prompt = f"{head}{str(item['context']).strip()}{delimiter}"
        # Strip the prompt alone: a trailing space would merge into the continuation's first
        # token and the prompt would no longer be a token prefix of the full text.
        return [prompt.strip(), prompt + str(item["continuation"])]
    raise ValueError(f"unsupported task type {task_type!r}")


def common_length(seqs: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """Length of the longest common prefix (or suffix) of token sequences."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        pos = -1 - i if from_end else i
        tok = first[pos]
        if any(s[pos] != tok for s in seqs[1:]):
            return i
    return n


@dataclass
class Request:
    """One example's sequences and the [start, end) token span scored in each."""

    idx: int
    gold: int | None
    seqs: list[list[int]]
    starts: list[int]
    ends: list[int]


def _encode_all(tokenizer: TokenizerLike, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    ids = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    return [[tokenizer.bos_id, *x] for x in ids]


def build_request(task: TaskSpec, data: list[dict[str, Any]], idx: int, tokenizer: TokenizerLike,
                  max_seq_len: int | None = None) -> Request:
    item = data[idx]
    shots = [data[j] for j in fewshot_indices(idx, len(data), task.num_fewshot)]
    seqs = _encode_all(tokenizer, render_prompts(task.task_type, item, task.delimiter, shots))
    if task.task_type == "multiple_choice":
        start = common_length(seqs)
        starts, ends = [start] * len(seqs), [len(s) for s in seqs]
    elif task.task_type == "schema":
        suffix = common_length(seqs, from_end=True)
        ends = [len(s) for s in seqs]
        starts = [e - suffix for e in ends]
    else:
        without, with_ = seqs
        # The stripped prompt is normally a token prefix of the full text; if a tokenizer merges
        # across the boundary anyway, score from where the two actually diverge.
        start = len(without) if with_[: len(without)] == without else common_length([without, with_])
        seqs, starts, ends = [with_], [start], [len(with_)]
    if max_seq_len is not None:  # keep the end (the part scored), crop the oldest context
        for i, s in enumerate(seqs):
            crop = len(s) - max_seq_len
            if crop > 0:
                seqs[i] = s[crop:]
                starts[i] = max(starts[i] - crop, 1)
                ends[i] -= crop
    return Request(idx=idx, gold=item.get("gold"), seqs=seqs, starts=starts, ends=ends)


# --------------------------------------------------------------------------- scoring


def _pack(requests: list[Request], batch_tokens: int, per_example: bool) -> list[list[tuple[int, int]]]:
    """Group (request, sequence) pairs into batches of at most ``batch_tokens`` padded tokens.

    Sorting by length first keeps padding small; ``per_example`` gives the plain baseline: one
    batch per example, as a one-example-at-a-time loop does.
    """
    if per_example:
        return [[(r, j) for j in range(len(req.seqs))] for r, req in enumerate(requests)]
    items = [(r, j) for r, req in enumerate(requests) for j in range(len(req.seqs))]
    items.sort(key=lambda rj: -len(requests[rj[0]].seqs[rj[1]]))
    batches: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    width = 0
    for rj in items:
        n = len(requests[rj[0]].seqs[rj[1]])
        w = max(width, n)
        if cur and w * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, w = [], n
        cur.append(rj)
        width = w
    if cur:
        batches.append(cur)
    return batches


Scored = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per sequence: (losses, argmax, targets)
# Run an example's shared prompt once only when that saves this many tokens of recomputation: below
# it, one more forward pass per example costs more than it saves, and the example is packed instead.
MIN_SHARED_SAVING = 16


def _read_full(scorer: Scorer, ids: np.ndarray, spans: list[tuple[int, int, int]]) -> Scored:
    """Score whole rows with a plain scorer and cut out the (row, lo, hi) position spans."""
    losses, preds = scorer(torch.from_numpy(ids))
    losses, preds = losses.float().cpu().numpy(), preds.cpu().numpy()
    return [(losses[r, lo:hi], preds[r, lo:hi], ids[r, lo + 1 : hi + 1]) for r, lo, hi in spans]


def _score_packed(scorer: Scorer, requests: list[Request], pad_id: int, batch_tokens: int,
                  per_example: bool) -> list[Scored]:
    """Every sequence in packed (or per-example) right-padded batches.

    ``per_example`` (or a plain scorer) scores full sequences; a :class:`ModelScorer` otherwise
    computes logits only at the scored positions.
    """
    out: list[Scored] = [[None] * len(r.seqs) for r in requests]  # type: ignore[list-item]
    selective = isinstance(scorer, ModelScorer) and not per_example
    for batch in _pack(requests, batch_tokens, per_example):
        ids = _right_padded([requests[r].seqs[j] for r, j in batch], pad_id)
        # position t predicts token t + 1, so tokens [s, e) are scored at positions [s - 1, e - 1)
        spans = [(row, requests[r].starts[j] - 1, max(requests[r].starts[j], requests[r].ends[j]) - 1)
                 for row, (r, j) in enumerate(batch)]
        scored = scorer.score_rows(ids, spans) if selective else _read_full(scorer, ids, spans)  # type: ignore[union-attr]
        for (r, j), sc in zip(batch, scored):
            out[r][j] = sc
    return out


def shared_prefix_length(req: Request) -> int:
    """Tokens every sequence of ``req`` starts with that no scored position needs logits for.

    Capped one short of the earliest scored token, since the position before a token predicts it.
    """
    return max(0, min(common_length(req.seqs), min(req.starts) - 1))


def worth_sharing(req: Request) -> bool:
    """Whether running the shared prompt once saves enough recomputation (see MIN_SHARED_SAVING)."""
    return (len(req.seqs) - 1) * shared_prefix_length(req) >= MIN_SHARED_SAVING


def _score_shared(scorer: ModelScorer, req: Request, pad_id: int) -> Scored:
    """One example: its shared prompt once into the KV cache, then its continuations together."""
    p = shared_prefix_length(req)
    suffixes = [s[p:] for s in req.seqs]
    spans = [(st - 1 - p, max(st, e) - 1 - p) for st, e in zip(req.starts, req.ends)]
    return scorer.score_shared(req.seqs[0][:p], suffixes, pad_id, spans)


def _judge(task_type: str, req: Request, scored: Scored) -> bool:
    """Correctness from the scored tokens: greedy match (LM) or lowest mean loss (MC, schema)."""
    if task_type == "language_modeling":
        _, preds, targets = scored[0]
        return bool(np.array_equal(preds, targets))
    mean_loss = [float(losses.mean()) if len(losses) else math.nan for losses, _, _ in scored]
    pred = min(range(len(mean_loss)), key=lambda i: (math.isnan(mean_loss[i]), mean_loss[i]))  # first lowest
    return pred == req.gold


def score_requests(scorer: Scorer, requests: list[Request], task_type: str, pad_id: int, *,
                   batch_tokens: int = 16384, per_example: bool = False) -> list[bool]:
    """Whether each request's prediction is correct.

    With a :class:`ModelScorer`, examples whose choices share a long enough prompt take the
    shared-prompt path (one KV-cached prompt per example); the rest are packed, logits only at
    scored tokens. Any other scorer, or ``per_example``, scores full sequences.
    """
    if any(min(r.starts) < 1 for r in requests):  # a span reaching before BOS: keep the plain path's slicing
        per_example = True
    shared = [isinstance(scorer, ModelScorer) and not per_example and worth_sharing(r) for r in requests]
    scored: list[Scored | None] = [None] * len(requests)
    for i, req in enumerate(requests):
        if shared[i]:
            scored[i] = _score_shared(scorer, req, pad_id)  # type: ignore[arg-type]
    rest = [i for i, s in enumerate(shared) if not s]
    packed = _score_packed(scorer, [requests[i] for i in rest], pad_id, batch_tokens, per_example)
    for i, sc in zip(rest, packed):
        scored[i] = sc
    return [_judge(task_type, r, sc) for r, sc in zip(requests, scored)]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tasks and CORE


@dataclass
class TaskResult:
    label: str
    task_type: str
    num_fewshot: int
    accuracy: float
    centered: float
    n: int
    baseline: float
    seconds: float


@dataclass
class CoreResult:
    core: float
    label: str
    tasks: dict[str, TaskResult]
    missing: list[str]
    missing_reasons: dict[str, str] = field(default_factory=dict)
    examples: int = 0
    seconds: float = 0.0
    world_size: int = 1

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def to_json(self) -> dict[str, Any]:
        return {
            "core": self.core,
            "label": self.label,
            "n_tasks": self.n_tasks,
            "tasks": {k: {"accuracy": t.accuracy, "centered": t.centered, "n": t.n, "type": t.task_type,
                          "shots": t.num_fewshot, "baseline": t.baseline, "seconds": round(t.seconds, 3)}
                      for k, t in self.tasks.items()},
            "missing": list(self.missing),
            "missing_reasons": dict(self.missing_reasons),
            "examples": self.examples,
            "seconds": round(self.seconds, 3),
            "examples_per_s": round(self.examples / self.seconds, 2) if self.seconds > 0 else None,
            "world_size": self.world_size,
        }


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so random guessing is 0 and perfect is 1 (``baseline`` is a fraction)."""
    return (accuracy - baseline) / (1.0 - baseline)


def prepare_data(rows: list[dict[str, Any]], max_per_task: int | None) -> list[dict[str, Any]]:
    """Shuffle with the fixed seed, then cap: a quick run scores a fixed random subset."""
    rows = list(rows)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows[:max_per_task] if max_per_task and max_per_task > 0 else rows


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(scorer: Scorer, tokenizer: TokenizerLike, task: TaskSpec, data: list[dict[str, Any]], *,
                  batch_tokens: int = 16384, max_seq_len: int | None = None, per_example: bool = False,
                  device: str | torch.device = "cpu") -> TaskResult:
    """Accuracy of one task over ``data`` (already shuffled/capped); examples strided over ranks."""
    t0 = time.time()
    rank, world = _dist()
    mine = list(range(rank, len(data), world))
    requests = [build_request(task, data, i, tokenizer, max_seq_len) for i in mine]
    ok = score_requests(scorer, requests, task.task_type, tokenizer.bos_id,
                        batch_tokens=batch_tokens, per_example=per_example)
    correct = torch.zeros(len(data), dtype=torch.float64, device=device)
    for i, c in zip(mine, ok):
        correct[i] = float(c)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    acc = float(correct.sum().item()) / len(data)
    return TaskResult(label=task.label, task_type=task.task_type, num_fewshot=task.num_fewshot, accuracy=acc,
                      centered=centered_accuracy(acc, task.baseline), n=len(data), baseline=task.baseline,
                      seconds=time.time() - t0)


def evaluate_core(scorer: Scorer, tokenizer: TokenizerLike, bundle: Bundle, *, max_per_task: int | None = None,
                  batch_tokens: int = 16384, max_seq_len: int | None = None, per_example: bool = False,
                  device: str | torch.device = "cpu", tasks: Sequence[str] | None = None,
                  progress: bool = False, log: Callable[[str], None] | None = None) -> CoreResult:
    """Score every available task of the bundle (or the named subset) and average the centered accuracies."""
    chosen = [t for t in bundle.tasks if tasks is None or t.label in tasks]
    if tasks is not None:
        unknown = sorted(set(tasks) - {t.label for t in bundle.tasks})
        if unknown:
            raise ValueError(f"tasks {unknown} are not available in the bundle at {bundle.root}")
    rank, world = _dist()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), desc="CORE", unit="task")
    t0 = time.time()
    results: dict[str, TaskResult] = {}
    for task in chosen:
        data = prepare_data(load_task_data(bundle, task), max_per_task)
        r = evaluate_task(scorer, tokenizer, task, data, batch_tokens=batch_tokens, max_seq_len=max_seq_len,
                          per_example=per_example, device=device)
        results[task.label] = r
        if log and rank == 0:
            log(f"{task.label:<34} acc {r.accuracy:.4f}  centered {r.centered:+.4f}  n={r.n}  {r.seconds:.1f}s")
        if bar is not None:
            bar.set_postfix_str(task.label)
            bar.update(1)
    if bar is not None:
        bar.close()
    core = sum(r.centered for r in results.values()) / len(results) if results else float("nan")
    missing = [m.label for m in bundle.missing]
    if tasks is not None:
        label = f"CORE-subset-{len(results)}"
    else:
        label = bundle.label
    return CoreResult(core=core, label=label, tasks=results, missing=missing,
                      missing_reasons={m.label: m.reason for m in bundle.missing},
                      examples=sum(r.n for r in results.values()), seconds=time.time() - t0, world_size=world)


def core_csv(result: CoreResult) -> str:
    """Per-task CSV in the column layout of the bundle's reference CSVs, plus n."""
    lines = ["task,type,shots,n,accuracy,centered"]
    for label, t in result.tasks.items():
        lines.append(f"{label},{t.task_type},{t.num_fewshot},{t.n},{t.accuracy:.6f},{t.centered:.6f}")
    lines.append(f"{result.label},,,{result.examples},,{result.core:.6f}")
    return "\n".join(lines) + "\n"


def comparison_table(result: CoreResult, bundle: Bundle) -> list[dict[str, Any]]:
    """Rows (task, ours, gpt2, gpt2-medium, ...) of centered scores; the CORE row recomputed on the same tasks."""
    from llm.eval.bundle import reference_core

    models = sorted(bundle.references, key=lambda m: (len(m), m))
    rows: list[dict[str, Any]] = []
    for label, t in result.tasks.items():
        row: dict[str, Any] = {"task": label, "ours": t.centered}
        for m in models:
            row[m] = bundle.references[m].get(label, {}).get("centered")
        rows.append(row)
    labels = list(result.tasks)
    core_row: dict[str, Any] = {"task": result.label, "ours": result.core}
    for m in models:
        core_row[m] = reference_core(bundle, m, labels)
    rows.append(core_row)
    return rows

