"""Token accounting, end to end: every count Kiln reports is exact and means the same thing everywhere.

The rules these tests pin down (also stated in ``llm/train/trainer.py``, ``llm/train/loaders.py`` and ``llm/data/shards.py``):

- **Trainer "tokens"** = optimizer steps × ``total_batch_tokens`` = input positions computed
  (``device_batch_size × seq_len × world_size × grad_accum`` per step). The same number is in
  ``metrics.jsonl``, ``summary.json`` (-> manifest ``counts.tokens``), the checkpoint meta and MLflow.
- **tokens_by_source** splits exactly those positions by where they came from, so it sums to "tokens"
  (SFT: ``chat`` + ``padding``; midtrain: ``pretrain`` + ``chat``). The realised midtrain ratio is
  computed from the same numbers.
- **supervised_tokens** = targets that carry loss (``y != -1``): all of them in pretraining and
  midtraining, assistant tokens only in SFT.
- **Token budget**: a ratio or FLOPs target is rounded UP to whole steps (never under budget, over by
  less than one step); the plan printed and logged is what runs.
- **Shards**: "tokens" includes the one BOS that starts every document; the manifest equals what the
  ``.bin``/``.idx.npy`` files hold, and train + val == total.
- **Epochs**: one epoch = every training document exactly once; ``epoch`` counts completed passes.

Every training run here is a ~100K-parameter model on the Markov fixture, one OpenMP thread.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import BOS, tiny_job, write_token_shards  # noqa: E402

from llm.chat.format import RenderedChats  # noqa: E402
from llm.config import TrainConfig  # noqa: E402
from llm.train.loaders import PretrainLoader  # noqa: E402
from llm.train.trainer import plan_tokens  # noqa: E402
from llm.train.stages import launch_training  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_tokens(tmp_path_factory) -> Path:
    """~2K training tokens: a few steps of 256 tokens wrap into several epochs."""
    return write_token_shards(tmp_path_factory.mktemp("tok") / "small", n_docs=30, val_docs=10, min_len=20, max_len=100)


def _launch(job: dict, nproc: int = 1, kind: str = "pretrain", train_cls=TrainConfig) -> dict:
    return launch_training(stage=job["stage"], model_config=job["model"], train_config=train_cls(**job["train"]),
                           loader_kind=kind, loader_spec=job["loader"]["spec"], out_dir=job["out_dir"],
                           seed=job["seed"], progress=False, nproc=nproc, mlflow=job.get("mlflow"),
                           on_line=lambda line: None)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _fast(tokens: Path, out: Path, **train) -> dict:
    """A job with no periodic eval/sampling cost beyond the final one."""
    kw = dict(eval_every=0, eval_tokens=128, log_every=1, ckpt_every=1000)
    kw.update(train)
    return tiny_job(tokens, out, **kw)


# --------------------------------------------------------------------------- pretraining


def test_pretrain_tokens_are_steps_times_batch_everywhere_two_procs_with_accum(small_tokens, tmp_path):
    """2 gloo processes × 2 accumulation steps: metrics, summary, plan, checkpoint meta and MLflow agree."""
    tracking = f"file://{tmp_path / 'mlruns'}"
    job = _fast(small_tokens, tmp_path / "run", steps=5, total_batch_tokens=4 * 32 * 2 * 2)
    job["mlflow"] = {"enabled": True, "tracking_uri": tracking, "experiment": "acct", "run_name": "acct"}
    s = _launch(job, nproc=2)
    tbt = 512
    assert s["world_size"] == 2 and s["steps"] == 5
    assert s["tokens"] == 5 * tbt and s["tokens_by_source"] == {"pretrain": 5 * tbt}
    assert s["supervised_tokens"] == 5 * tbt  # pretraining: every target carries loss
    rows = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["tokens"] == r["step"] * tbt for r in rows)
    assert all(r["supervised_tokens"] == r["step"] * tbt for r in rows)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["grad_accum"] == 2 and plan["world_size"] == 2
    assert plan["tokens_per_step"] == plan["device_batch_size"] * plan["seq_len"] * 2 * 2 == tbt
    assert plan["steps"] == s["steps"] and plan["tokens"] == s["tokens"]
    meta = json.loads((tmp_path / "run" / "final" / "meta.json").read_text())
    assert meta["tokens"] == 5 * tbt and meta["supervised_tokens"] == 5 * tbt
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking)
    hist = c.get_metric_history(s["mlflow_run_id"], "tokens")
    assert sorted((m.step, m.value) for m in hist) == [(k, k * tbt) for k in range(1, 6)]
    run = c.get_run(s["mlflow_run_id"])
    assert run.data.metrics["final/tokens"] == 5 * tbt
    assert run.data.metrics["final/supervised_tokens"] == 5 * tbt


def _simulate_crash_after(out: Path, step: int) -> None:
    """Leave ``out`` as a run killed after checkpoint ``step``: later checkpoints, final/ and summary gone,
    metrics rows past the checkpoint still there (they must be dropped, not double counted)."""
    for p in (out / "checkpoints").iterdir():
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(out / "final")
    for name in ("summary.json", "status.json"):
        (out / name).unlink()


@pytest.fixture(scope="module")
def uninterrupted(small_tokens, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("ref") / "ref"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("OMP_NUM_THREADS", "1")
        return _launch(_fast(small_tokens, out, steps=8, ckpt_every=4)), out


@pytest.mark.parametrize("nproc_before", [1, 2])
def test_resume_neither_loses_nor_double_counts_tokens(small_tokens, uninterrupted, tmp_path, nproc_before):
    """A run crashed after its step-4 checkpoint and resumed on ONE process counts every token once,
    whatever the world size before the crash (2 -> 1 used to lose a quarter of them); its epochs and
    counts match an uninterrupted run."""
    ref, ref_out = uninterrupted
    job = _fast(small_tokens, tmp_path / "run", steps=8, ckpt_every=4)
    _launch(job, nproc=nproc_before)
    _simulate_crash_after(tmp_path / "run", 4)
    s = _launch(job, nproc=1)
    assert s["steps"] == 8 and s["tokens"] == 8 * 256
    assert s["tokens_by_source"] == ref["tokens_by_source"] == {"pretrain": 8 * 256}
    assert s["supervised_tokens"] == ref["supervised_tokens"] == 8 * 256
    rows, ref_rows = _metrics(tmp_path / "run"), _metrics(ref_out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # rows after the checkpoint replaced, not repeated
    for key in ("tokens", "supervised_tokens", "epoch"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key
    assert rows[-1]["epoch"] >= 1  # the small data wrapped at least once, so the epoch check means something


# --------------------------------------------------------------------------- the budget


class _Budget:
    def __init__(self, **kw):
        self.total_batch_tokens = 1000
        self.steps = None
        self.target_flops = None
        self.target_param_data_ratio = 20.0
        self.__dict__.update(kw)


@pytest.mark.parametrize("params, ratio, want_steps", [
    (10_000, 20.0, 200),  # exact: 200,000 tokens
    (10_001, 20.0, 201),  # 200,020 tokens: 200.02 steps -> 201 (round() gave 200: under budget)
    (10_025, 20.0, 201),  # 200.5 steps -> 201 (round() gave 200: banker's rounding)
    (10_075, 20.0, 202),  # 201.5 steps -> 202
    (1, 20.0, 1),  # a tiny budget still runs one step
])
def test_ratio_budget_rounds_up_to_whole_steps(params, ratio, want_steps):
    p = plan_tokens(_Budget(target_param_data_ratio=ratio), params, 6 * params)
    assert p["steps"] == want_steps and p["tokens"] == want_steps * 1000
    assert p["budget_tokens"] == ratio * params
    assert p["budget_tokens"] <= p["tokens"] < p["budget_tokens"] + 1000 or p["steps"] == 1


def test_ratio_budget_counts_the_scaling_params_when_given():
    """nanochat's D:N counts block matrices + lm_head; the embedding (a lookup, no FLOPs) is left out."""
    p = plan_tokens(_Budget(target_param_data_ratio=12.0), 15_000, 60_000, scaling_params=10_000)
    assert p["budget_tokens"] == 120_000 and p["steps"] == 120 and p["tokens_per_scaling_param"] == 12.0
    assert p["params"] == 15_000 and p["tokens_per_param"] == 8.0 and "12×scaling params" in p["budget"]


def test_scaling_params_are_the_block_matrices_and_the_lm_head():
    from llm.model import GPT, GPTConfig

    m = GPT(GPTConfig(vocab_size=512, depth=2, aspect_ratio=32, head_dim=32, seq_len=32, value_embeds=True))
    blocks = sum(p.numel() for p in m.blocks.parameters())
    assert m.num_scaling_params() == blocks + 512 * 64
    assert m.num_params() - m.num_scaling_params() == m.num_embedding_params()  # wte + value embeddings


@pytest.mark.parametrize("target_flops, want_steps", [(6e6, 1), (6.0e7, 10), (6.3e7, 11), (6.5e7, 11)])
def test_flops_budget_rounds_up_to_whole_steps(target_flops, want_steps):
    p = plan_tokens(_Budget(target_flops=target_flops), 1000, 6000)  # 6e6 FLOPs per 1000-token step
    assert p["steps"] == want_steps and p["flops"] == 6000 * 1000 * want_steps
    assert p["flops"] >= target_flops and p["flops"] - target_flops < 6e6


def test_plan_printed_and_logged_is_what_ran_and_throughput_skips_pauses(small_tokens, tmp_path):
    """A ratio budget: plan.json and the printed plan are what actually runs; tokens_per_s counts every
    step's tokens against every step's time (eval and checkpoint pauses excluded, not the steps before)."""
    import subprocess

    sleep = 0.15  # every step takes at least this long, so no honest rate can exceed 256 / sleep
    job = _fast(small_tokens, tmp_path / "run", steps=None, target_param_data_ratio=0.016, log_every=4,
                ckpt_every=2, eval_every=3)
    job["step_sleep_s"], job["progress"] = sleep, True
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "llm.train.trainer", "--job", str(tmp_path / "job.json")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    want = math.ceil(0.016 * plan["scaling_params"] / 256)
    assert want >= 5
    assert plan["steps"] == s["steps"] == want and plan["tokens"] == s["tokens"] == want * 256
    # The ratio counts the scaling parameters (block matrices + lm_head), not the embedding.
    assert plan["scaling_params"] < s["params"]
    assert plan["budget_tokens"] == pytest.approx(0.016 * plan["scaling_params"]) and plan["budget_tokens"] <= plan["tokens"]
    text = proc.stdout
    assert f"steps      {want:,}" in text and f"tokens     {want * 256:,}" in text and "rounded up" in text
    assert f"{want} steps, {want * 256:,} tokens" in text  # the closing line
    rates = [r["tokens_per_s"] for r in _metrics(tmp_path / "run") if "tokens_per_s" in r]
    assert len(rates) >= 3 and max(rates) <= 256 / sleep * 1.02, rates


# --------------------------------------------------------------------------- loader epochs


def _identifiable_shards(root: Path, lengths: list[int], shard_tokens: int = 300) -> Path:
    """Document i = [BOS, i+1, i+1, ...] (length lengths[i]) so every packed piece names its document."""
    from llm.data.shards import ShardWriter

    root.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": "uint16", "vocab_size": 1000, "bos_id": BOS, "splits": {}}
    for split, lens in (("train", lengths), ("val", [40] * 4)):
        w = ShardWriter(root, split, np.dtype(np.uint16), shard_tokens)
        docs = [np.array([BOS] + [i + 1] * (n - 1), dtype=np.uint16) for i, n in enumerate(lens)]
        w.add(np.concatenate(docs), np.array(lens))
        meta["splits"][split] = w.close()
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _pieces(rows: np.ndarray) -> list[tuple[int, int]]:
    """(document id, tokens taken) for every piece of every packed row, in order."""
    out = []
    for row in rows:
        starts = np.flatnonzero(row == BOS)
        assert starts[0] == 0, "a row must start at a document start"
        for a, b in zip(starts, list(starts[1:]) + [len(row)]):
            out.append((int(row[a + 1]) - 1 if b - a > 1 else -1, int(b - a)))
    return out


@pytest.mark.parametrize("buffer_docs", [1, 8, 64])
def test_every_epoch_reads_every_document_exactly_once(tmp_path, buffer_docs):
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(3, 60, size=25)]
    uri = _identifiable_shards(tmp_path / "tok", lengths)
    T, B = 32, 2
    loader = PretrainLoader({"uri": str(uri), "buffer_docs": buffer_docs}, batch_size=B, seq_len=T, rank=0,
                            world_size=1, seed=3)
    rows, epochs = [], []
    for _ in range(60):  # ~ 60·2·33 tokens ≈ 3.9K = several passes over ~800 tokens
        x, y = loader.next_batch()
        rows.append(torch.cat([x, y[:, -1:]], dim=1).numpy())
        epochs.append(loader.epoch)
    pieces = _pieces(np.concatenate(rows))
    n = len(lengths)
    done = len(pieces) // n
    assert done >= 3
    orders = []
    for e in range(done):
        ep = pieces[e * n:(e + 1) * n]
        docs = [d for d, _ in ep]
        known = [d for d in docs if d >= 0]  # -1: a piece cropped to its BOS alone (end of a row)
        assert len(set(known)) == len(known), f"epoch {e}: a document read twice"
        docs = known + sorted(set(range(n)) - set(known))
        assert sorted(docs) == list(range(n)), f"epoch {e}: a document missing"
        # tokens read in the epoch + the cropped tails == every token of the split, BOS included
        assert all(0 < take <= lengths[d] for d, take in ep if d >= 0)
        orders.append(docs)
    assert orders[0] != orders[1]  # a new permutation each epoch (best-fit reorders within the buffer only)
    # the epoch counter counts completed passes: it equals the passes finished by the last batch
    consumed = len(_pieces(np.concatenate(rows)))
    assert epochs[-1] == consumed // n
    # tokens_seen counts input positions: T per row of T+1 shard tokens
    assert loader.tokens_seen_by_source == {"pretrain": 60 * B * T}
    # resuming from the state continues with the same epoch and the same next batch
    again = PretrainLoader({"uri": str(uri), "buffer_docs": buffer_docs}, batch_size=B, seq_len=T, rank=0,
                           world_size=1, seed=3)
    again.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert again.epoch == loader.epoch
    assert torch.equal(again.next_batch()[0], loader.next_batch()[0])


# --------------------------------------------------------------------------- tokenize -> shards


def test_tokenize_manifest_equals_the_shard_files(tmp_path):
    """Counts in meta.json and the manifest == what the .bin and .idx.npy files hold; BOS is one token of
    every document and is included in "tokens"; train + val == total; nothing lost or repeated across
    shard boundaries (tiny shards, one document longer than a shard)."""
    from tests._tok_helpers import publish_docs

    from llm.config import load_config
    from llm.data import tokenize as tokenize_stage
    from llm.data.shards import doc_bucket
    from llm.stages.output import run_stage
    from llm.storage import Store
    from llm.data.tokenizer import train_tokenizer
    from llm.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    words = ["kiln", "fires", "clay", "tokens", "count", "every", "shard", "exact", "the", "a", "of", "and"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(60)]
    texts[5] = " ".join(["long"] * 400)  # longer than a whole shard: gets a shard of its own
    texts[9] = ""  # skipped, counted apart
    docs = [{"text": t, "id": f"doc-{i}", "url": ""} for i, t in enumerate(texts)]
    root = tmp_path / "art"
    docs_uri = publish_docs(root, [docs[:35], docs[35:]], row_group_size=8)
    tok, _ = train_tokenizer(texts, 300)
    tok.save(tmp_path / "tokenizer")
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    cfg = load_config("tiny", {"run.artifact_root": str(root), "tokenize.val_fraction": 0.3,
                               "tokenize.shard_tokens": 120, "tokenize.workers": 1})
    inputs = {"docs": {"uri": docs_uri}, "tokenizer": {"uri": str(tmp_path / "tokenizer")}}
    res = run_stage(Store(str(root)), "tokenize", {"t": 1}, {}, "test",
                    lambda out, _: tokenize_stage.run(cfg, out, inputs, progress=False))
    counts, out = res.manifest["counts"], Path(res.uri)
    meta = json.loads((out / "meta.json").read_text())
    expected = {"train": [], "val": []}
    for d in docs:
        if d["text"]:
            expected["val" if doc_bucket(d["id"]) < 0.3 else "train"].append([tok.bos_id] + tok.encode(d["text"]))
    for split in ("train", "val"):
        files = meta["splits"][split]["shards"]
        assert len(files) >= (3 if split == "train" else 1)
        streams, n_docs = [], 0
        for rel in files:  # the raw files, not the reader: the format itself must add up
            toks = np.fromfile(out / rel, dtype=meta["dtype"])
            starts = np.load(out / rel.replace(".bin", ".idx.npy"))
            assert toks[0] == tok.bos_id and np.all(toks[starts] == tok.bos_id)
            assert int(np.count_nonzero(toks == tok.bos_id)) == len(starts)  # one BOS per document, no more
            ends = np.append(starts[1:], len(toks))
            streams += [toks[a:b].tolist() for a, b in zip(starts, ends)]
            n_docs += len(starts)
        assert streams == expected[split]  # every document once, in order, whole, across shard boundaries
        n_tokens = sum(len(x) for x in expected[split])  # BOS included
        assert meta["splits"][split]["tokens"] == counts[f"{split}_tokens"] == n_tokens
        assert meta["splits"][split]["docs"] == counts[f"{split}_docs"] == n_docs == len(expected[split])
        assert counts[f"{split}_shards"] == len(files)
    assert counts["tokens"] == counts["train_tokens"] + counts["val_tokens"]
    assert counts["docs"] == counts["train_docs"] + counts["val_docs"] == len(texts) - 1
    assert counts["empty_docs_skipped"] == 1
    assert counts["bytes_per_token"] == round(counts["bytes"] / counts["tokens"], 4)  # per token, BOS included


# --------------------------------------------------------------------------- midtraining and SFT


def _chats(n: int, seed: int, lo: int = 6, hi: int = 30) -> RenderedChats:
    """Random conversations over the fixture's 64-token vocabulary: BOS first, ~half the tokens supervised."""
    rng = np.random.default_rng(seed)
    off = np.concatenate([[0], np.cumsum(rng.integers(lo, hi, size=n))]).astype(np.int64)
    ids = rng.integers(1, 64, size=int(off[-1])).astype(np.uint16)
    ids[off[:-1]] = BOS
    mask = (rng.random(int(off[-1])) < 0.5).astype(np.uint8)
    mask[off[:-1]] = 0
    return RenderedChats(ids, mask, off)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chats")
    _chats(80, seed=1).save(d, "train")
    _chats(20, seed=2).save(d, "val")
    return d


def test_midtrain_tokens_by_source_sum_to_tokens_and_ratio_uses_them(small_tokens, chat_dir, tmp_path):
    from llm.train.chat_loaders import MixtureLoader

    spec = {"tokens_uri": str(small_tokens), "chat_dir": str(chat_dir), "chat_ratio": 0.3}
    job = _fast(small_tokens, tmp_path / "mid", steps=4)
    job["stage"], job["loader"] = "midtrain", {"kind": "midtrain", "spec": spec}
    s = _launch(job, kind="midtrain")
    assert s["tokens"] == 4 * 256 == sum(s["tokens_by_source"].values())
    assert set(s["tokens_by_source"]) == {"pretrain", "chat"} and s["tokens_by_source"]["chat"] > 0
    assert s["supervised_tokens"] == s["tokens"]  # midtraining trains every target
    # 2 ranks: the summed per-rank counts are the global ones, and the loader's realised ratio is
    # computed from exactly those numbers (as the stage's chat_ratio_realised is)
    ranks = [MixtureLoader(spec, batch_size=2, seq_len=32, rank=r, world_size=2, seed=7) for r in range(2)]
    for _ in range(12):
        for r in ranks:
            r.next_batch()
    summed = {k: sum(r.tokens_seen_by_source[k] for r in ranks) for k in ("pretrain", "chat")}
    assert sum(summed.values()) == 12 * 2 * 2 * 32
    assert all(r.realised_chat_ratio() == summed["chat"] / sum(summed.values()) for r in ranks)
    assert abs(ranks[0].realised_chat_ratio() - 0.3) < 0.05


def test_sft_tokens_are_positions_and_supervised_tokens_are_reported(small_tokens, chat_dir, tmp_path):
    """SFT "tokens" = positions computed (chat + padding); supervised_tokens = assistant targets, the
    number SFT users compare. Both are in metrics.jsonl, summary.json and the checkpoint meta."""
    from llm.train.chat_loaders import SFTLoader

    spec = {"chat_dir": str(chat_dir), "pad_id": BOS}
    job = _fast(small_tokens, tmp_path / "sft", steps=4)  # 256 tokens/step = 4 rows × 32 × 2 accumulation
    job["stage"], job["loader"] = "sft", {"kind": "sft", "spec": spec}
    s = _launch(job, kind="sft")
    assert s["tokens"] == 4 * 256 == s["tokens_by_source"]["chat"] + s["tokens_by_source"]["padding"]
    # replay the same loader: the count of loss-bearing targets the trainer must have reported
    replay = SFTLoader(spec, batch_size=4, seq_len=32, rank=0, world_size=1, seed=job["seed"])
    per_step = []
    for _ in range(4):
        per_step.append(sum(int((replay.next_batch()[1] != -1).sum()) for _ in range(2)))
    cumulative = list(np.cumsum(per_step))
    assert s["supervised_tokens"] == cumulative[-1] == replay.supervised_tokens
    assert 0 < s["supervised_tokens"] < s["tokens_by_source"]["chat"]
    assert s["tokens_by_source"] == replay.tokens_seen_by_source
    rows = [r for r in _metrics(tmp_path / "sft") if "loss" in r]
    assert [r["supervised_tokens"] for r in rows] == cumulative
    assert [r["tokens"] for r in rows] == [256 * k for k in range(1, 5)]
    assert json.loads((tmp_path / "sft" / "final" / "meta.json").read_text())["supervised_tokens"] == cumulative[-1]


# --------------------------------------------------------------------------- nanochat's depth rules


def _preset_train(preset: str, **overrides):
    from llm.config import load_config
    from llm.model import GPTConfig

    cfg = load_config(preset, [f"pretrain.{k}={v}" for k, v in overrides.items()])
    return cfg.pretrain, GPTConfig.from_model_config(cfg.model, cfg.tokenizer.vocab_size)


def test_depth_scaling_is_the_identity_at_d12_and_follows_nanochats_rules_at_d20():
    """B = 2^round(log2(2^19·(D/D12)^0.383)), LR × √(B/2^19), WD × √(B/2^19)·D12/D (scripts/base_train.py)."""
    from llm.train.optim import resolved, scaled_for_depth, scaling_params

    tr12, m12 = _preset_train("d12", depth_scaling="true")
    s12 = scaled_for_depth(tr12, m12)
    assert (s12.total_batch_tokens, s12.lr, s12.weight_decay) == (2 ** 19, tr12.lr, pytest.approx(0.28))
    tr20, m20 = _preset_train("d20", depth_scaling="true")
    s20 = scaled_for_depth(tr20, m20)
    d20, d12 = scaling_params(m20), scaling_params(m12)
    assert s20.total_batch_tokens == 2 ** 20  # D20/D12 = 2.94: 2^19 · 2.94^0.383 = 2^19.6 -> 2^20
    assert s20.lr == pytest.approx(0.02 * 2 ** 0.5)
    assert s20.embedding_lr == pytest.approx(resolved(tr20, "embedding_lr", m20.model_dim) * 2 ** 0.5)
    assert s20.weight_decay == pytest.approx(0.28 * 2 ** 0.5 * d12 / d20)
    assert not s20.depth_scaling and scaled_for_depth(s20, m20) == s20  # applied once, then concrete
    off, _ = _preset_train("d20")
    assert scaled_for_depth(off, m20) is off


def test_plan_shows_the_depth_scaled_batch(capsys, tmp_path, monkeypatch):
    from llm.cli.main import main as kiln

    monkeypatch.chdir(tmp_path)
    assert kiln(["plan", "--preset", "d20", "--nproc", "8", "--stage", "pretrain", "--json",
                 "--set", "pretrain.depth_scaling=true"]) == 0
    (pre,) = json.loads(capsys.readouterr().out)
    assert pre["total_batch_tokens"] == 2 ** 20 and pre["grad_accum"] == 2
    assert pre["tokens"] == pre["steps"] * 2 ** 20 >= 12 * pre["scaling_params"]


def test_trainer_runs_the_depth_scaled_batch(small_tokens, tmp_path):
    """The trainer applies the rule itself: plan.json shows the rule's batch, not the job's."""
    from llm.model import GPTConfig
    from llm.train.optim import scaled_for_depth

    job = _fast(small_tokens, tmp_path / "run", steps=1, depth_scaling=True)
    want = scaled_for_depth(TrainConfig.model_validate(job["train"]), GPTConfig.from_dict(job["model"]))
    assert want.total_batch_tokens != job["train"]["total_batch_tokens"]
    s = _launch(job)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["tokens_per_step"] == want.total_batch_tokens == s["tokens"]
    assert plan["grad_accum"] == want.total_batch_tokens // (plan["device_batch_size"] * plan["seq_len"])


def test_a_depth_scaled_batch_that_does_not_divide_is_refused_before_launch_naming_the_rule(tmp_path):
    from llm.stages.output import StageError
    from llm.train.stages import launch_training

    from llm.config import load_config
    from llm.model import GPTConfig

    cfg = load_config("d12", ["model.depth=4", "pretrain.depth_scaling=true", "pretrain.device=cpu"])
    mcfg = GPTConfig.from_model_config(cfg.model, cfg.tokenizer.vocab_size)
    # d4's rule batch is 2^18 tokens; 8 processes × 32 × 2048 is 2^19 per micro-step.
    with pytest.raises(StageError, match=r"pretrain: total_batch_tokens 262144 is not a multiple .* from "
                                         r"pretrain.depth_scaling"):
        launch_training(stage="pretrain", model_config=mcfg.to_dict(), train_config=cfg.pretrain,
                        loader_kind="pretrain", loader_spec={}, out_dir=tmp_path / "out", nproc=8)
