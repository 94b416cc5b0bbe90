"""The eval stage end to end on real stage outputs: tiny BPE, token shards, a random tiny GPT checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from _tok_helpers import real_docs
from llm.config import load_config
from llm.stages.output import run_stage
from llm.stages.registry import execute
from llm.storage import Store

VOCAB = 512


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, shared_data) -> dict[str, str]:
    """Published tokenizer / tokenize / pretrain outputs (content-addressed, with manifests)."""
    import torch

    from llm.checkpoint import save_checkpoint
    from llm.data.shards import ShardWriter
    from llm.model import GPT, GPTConfig
    from llm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("art")
    store = Store(str(root))
    docs = [d["text"] for d in real_docs(shared_data, 240)]
    tok, _ = train_tokenizer(docs[:200], VOCAB)

    def tokenizer_fn(out, inputs):
        tok.save(out.workdir)
        return {"counts": {"vocab_size": tok.vocab_size}}

    def tokens_fn(out, inputs):
        meta = {"dtype": "uint16", "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "splits": {}}
        for split, part in (("train", docs[:200]), ("val", docs[200:])):
            w = ShardWriter(out.workdir, split, np.uint16, 1 << 20)
            ids = [[tok.bos_id, *x] for x in tok.encode_batch(part)]
            w.add(np.concatenate([np.asarray(x) for x in ids]), np.asarray([len(x) for x in ids]))
            meta["splits"][split] = w.close()
        (out.workdir / "meta.json").write_text(json.dumps(meta))
        return {"counts": {"tokens": sum(s["tokens"] for s in meta["splits"].values())}}

    def model_fn(out, inputs):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=VOCAB, depth=2, aspect_ratio=32, head_dim=16, seq_len=128)
        save_checkpoint(out.workdir / "final", model_state=GPT(cfg).state_dict(),
                        meta={"model_config": cfg.to_dict(), "step": 0, "tokens": 0})
        return {"counts": {"params": 1, "steps": 0}}

    return {
        "tokenizer": run_stage(store, "tokenizer", {"t": 1}, {}, "test", tokenizer_fn).uri,
        "tokens": run_stage(store, "tokenize", {"t": 1}, {}, "test", tokens_fn).uri,
        "model": run_stage(store, "pretrain", {"t": 1}, {}, "test", model_fn).uri,
        "root": str(root),
    }


def _cfg(root: str, **extra):
    over = {"run.artifact_root": root, "eval.max_per_task": 2, "eval.batch_tokens": 4096, "eval.bpb_tokens": 4096,
            "eval.sample_max_tokens": 4, "eval.device": "cpu", "eval.nproc": 1}
    return load_config("tiny", over | extra)


def _results(uri: str) -> dict:
    return {n: json.loads((Path(uri) / n).read_text()) for n in ("core.json", "bpb.json", "samples.json")}


def test_eval_stage_writes_core_bpb_samples_and_logs_mlflow(upstream, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # conftest points MLflow at a file store
    inputs = {k: upstream[k] for k in ("model", "tokenizer", "tokens")}
    r = execute("eval", _cfg(upstream["root"]), inputs, progress=False)
    res = _results(r.uri)
    core = res["core.json"]
    assert core["label"] == "CORE-20 (squad, coqa missing)" and core["n_tasks"] == 20
    assert core["missing"] == ["squad", "coqa"]
    assert all(t["n"] == 2 for t in core["tasks"].values())
    assert core["core"] == pytest.approx(sum(t["centered"] for t in core["tasks"].values()) / 20)
    assert core["comparison"][-1]["task"] == core["label"] and core["comparison"][-1]["gpt2"] is not None
    csv_lines = (Path(r.uri) / "core.csv").read_text().splitlines()
    assert len(csv_lines) == 22 and csv_lines[-1].startswith("CORE-20")
    # A freshly initialised GPT predicts nearly uniformly (tiny lm_head), so the loss is ~ln(V) per
    # token and bpb ~ log2(V) * tokens / bytes: a number we know without the model.
    bpb = res["bpb.json"]
    assert bpb["loss_per_token"] == pytest.approx(math.log(VOCAB), rel=0.01)
    assert bpb["bpb"] == pytest.approx(math.log2(VOCAB) * bpb["tokens"] / bpb["bytes"], rel=0.01)
    assert 4000 < bpb["tokens"] <= 4096  # targets of the first 4097 val tokens, minus any BOS
    assert [s["prompt"] for s in res["samples.json"]] == _cfg(upstream["root"]).eval.sample_prompts
    assert r.manifest["counts"]["n_tasks"] == 20 and r.manifest["core_label"].startswith("CORE-20")

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = [run for e in client.search_experiments() for run in client.search_runs([e.experiment_id])]
    logged = {k for run in runs for k in run.data.metrics}
    assert {"core", "bpb", "core_centered/copa", "core_acc/winograd"} <= logged
    # What was scored is on the run as MLflow dataset inputs, named by content (the upstream manifest hashes).
    ev = next(run for run in runs if "core" in run.data.metrics)
    digests = {d.dataset.digest for d in client.get_run(ev.info.run_id).inputs.dataset_inputs}
    assert {r.manifest["inputs"][role]["hash"] for role in ("model", "tokenizer")} <= digests


def test_eval_under_torchrun_with_two_ranks_matches_one_rank(upstream):
    inputs = {k: upstream[k] for k in ("model", "tokenizer", "tokens")}
    quick = {"eval.tasks": ["copa", "winograd", "lambada_openai", "arc_easy"], "eval.max_per_task": 5}
    one = _results(execute("eval", _cfg(upstream["root"], **quick), inputs, progress=False).uri)
    two = _results(execute("eval", _cfg(upstream["root"], **quick, **{"eval.nproc": 2}), inputs, force=True,
                           progress=False).uri)
    assert one["core.json"]["label"] == "CORE-subset-4" and one["core.json"]["world_size"] == 1
    assert two["core.json"]["world_size"] == 2
    strip = lambda c: {k: (t["accuracy"], t["n"]) for k, t in c["tasks"].items()} | {"core": c["core"]}  # noqa: E731
    assert strip(two["core.json"]) == strip(one["core.json"])
    assert two["bpb.json"]["bpb"] == pytest.approx(one["bpb.json"]["bpb"], rel=1e-6)
    assert two["samples.json"] == one["samples.json"]


def test_kiln_eval_checkpoint_cli(upstream, capsys):
    from llm.cli.main import main

    args = ["eval", "--checkpoint", upstream["model"], "--input", f"tokenizer={upstream['tokenizer']}",
            "--input", f"tokens={upstream['tokens']}", "--output", upstream["root"], "--quiet"]
    for k, v in {"eval.max_per_task": 2, "eval.batch_tokens": 4096, "eval.bpb_tokens": 4096,
                 "eval.sample_max_tokens": 4, "eval.device": "cpu", "eval.nproc": 1}.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "eval" in out and "core=" in out


def test_kiln_eval_checkpoint_resolves_only_the_missing_inputs():
    # With --checkpoint given, the tokenizer/tokens come from the data chain; no training stage is run.
    from llm.cli.main import _parse_inputs
    from llm.stages.pipeline import target_step, upstream_steps

    inputs = _parse_inputs("eval", [], "/some/pretrain/output")
    assert inputs == {"model": "/some/pretrain/output"}
    cfg, target = load_config("tiny"), target_step(load_config("tiny"), "eval")
    assert [s.stage for s in upstream_steps(cfg, target, ["tokenizer", "tokens"])] == [
        "download", "filter", "dedup", "tokenizer", "tokenize"]
    assert upstream_steps(cfg, target, ["model", "tokenizer", "tokens"])[-1].stage == "sft"


def test_kiln_eval_on_a_bare_checkpoint_dir(upstream, capsys, tmp_path):
    """A checkpoint directory (no stage manifest) is evaluated too; its meta.json is its identity."""
    import shutil

    from llm.cli.main import main

    ckpt = tmp_path / "step_000007"
    shutil.copytree(Path(upstream["model"]) / "final", ckpt)
    args = ["eval", "--checkpoint", str(ckpt), "--input", f"tokenizer={upstream['tokenizer']}",
            "--input", f"tokens={upstream['tokens']}", "--output", upstream["root"], "--quiet",
            "--set", "eval.tasks=[copa]", "--set", "eval.max_per_task=2", "--set", "eval.bpb_tokens=4096",
            "--set", "eval.sample_max_tokens=2", "--set", "eval.device=cpu"]
    assert main(args) == 0
    assert "core=" in capsys.readouterr().out
    # A damaged checkpoint is refused with the file named, not evaluated.
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(args) == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_one_loss_serves_val_loss_and_bpb_whatever_the_batching():
    """llm.eval.loss.evaluate_loss, which the trainer, SFT and the eval stage all use: the mean loss is
    over every target (y != -1), bits per byte only over targets that stand for text (bytes > 0), and
    the sums do not depend on how the rows are batched."""
    import torch

    from llm.eval.loss import evaluate_loss
    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, depth=1, aspect_ratio=32, head_dim=16, seq_len=16))
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (6, 16), generator=g)
    y = torch.randint(0, 64, (6, 16), generator=g)
    y[:, ::5] = -1  # ignored targets
    token_bytes = np.full(64, 2, dtype=np.int64)
    token_bytes[:3] = 0  # three special tokens: scored by the loss, not by bpb
    whole = evaluate_loss(model, [(x, y)], token_bytes=token_bytes)
    split = evaluate_loss(model, [(x[:2], y[:2]), (x[2:], y[2:])], token_bytes=token_bytes)
    with torch.no_grad():
        per_pos = model(x, y, reduction="none").double()
    text = y >= 3
    assert whole.tokens == int((y != -1).sum())
    assert whole.mean_loss == pytest.approx(float(per_pos.sum()) / whole.tokens, rel=1e-12)
    assert whole.bytes == 2 * int(text.sum())
    assert whole.bpb == pytest.approx(float(per_pos[text].sum()) / (math.log(2) * whole.bytes), rel=1e-12)
    assert split.tokens == whole.tokens and split.bytes == whole.bytes
    assert split.mean_loss == pytest.approx(whole.mean_loss, rel=1e-12)
    assert evaluate_loss(model, [(x, y)]).bytes == 0 and math.isnan(evaluate_loss(model, [(x, y)]).bpb)
    assert model.training  # restored: the trainer calls it mid-run
