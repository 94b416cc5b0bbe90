"""The registry stage "pretrain" on the tiny preset: real tokenizer, real shards, torchrun, MLflow, manifest.

Upstream outputs are built here from a slice of the offline kit with the tokenizer helper's own code
(``train_tokenizer`` + ``ShardWriter``) and published through ``run_stage`` so they carry real manifests;
only the pretrain stage itself is under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from llm.checkpoint import load_model
from llm.config import load_config
from llm.stages.output import run_stage
from llm.stages.registry import execute
from llm.storage import Store


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # conftest points MLflow at a file store


def _texts(shared_data: Path, n: int) -> list[str]:
    table = pq.read_table(sorted((shared_data / "pretrain").glob("*.parquet"))[0], columns=["text"])
    return [t[:2000] for t in table.column("text").to_pylist()[:n]]


def _upstream(shared_data: Path, root: Path) -> dict[str, str]:
    from llm.data.shards import META_FILE, ShardWriter, token_dtype
    from llm.data.tokenizer import train_tokenizer

    texts = _texts(shared_data, 260)
    store = Store(str(root))
    tok, _ = train_tokenizer(texts[:200], 512)

    def make_tokenizer(out, _inputs):
        tok.save(out.workdir)
        return {"counts": {"vocab_size": tok.vocab_size}}

    def make_tokens(out, _inputs):
        dtype = token_dtype(tok.vocab_size)
        meta = {"format": "kiln-tokens", "version": 1, "dtype": dtype.name, "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id, "splits": {}}
        for split, chunk in (("train", texts[:240]), ("val", texts[240:])):
            w = ShardWriter(out.workdir, split, dtype, shard_tokens=60_000)
            docs = [[tok.bos_id] + tok.encode(t) for t in chunk]
            w.add(np.concatenate([np.asarray(d) for d in docs]), np.asarray([len(d) for d in docs]))
            meta["splits"][split] = w.close()
        (out.workdir / META_FILE).write_text(json.dumps(meta))
        return {"counts": {"tokens": meta["splits"]["train"]["tokens"]}}

    t = run_stage(store, "tokenizer", {"test": 1}, {}, "test", make_tokenizer)
    k = run_stage(store, "tokenize", {"test": 1}, {}, "test", make_tokens)
    return {"tokenizer": t.uri, "tokens": k.uri}


def test_pretrain_stage_tiny_preset_loss_falls(shared_data, artifact_root, tmp_path):
    inputs = _upstream(shared_data, artifact_root)
    cfg = load_config("tiny", [f"run.artifact_root={artifact_root}", "pretrain.steps=24", "pretrain.eval_every=12",
                                "pretrain.log_every=4", "pretrain.ckpt_every=12", "pretrain.eval_tokens=8192"])
    res = execute("pretrain", cfg, inputs, progress=False)
    m = res.manifest
    c = m["counts"]
    # the tiny preset's model: depth 2, dim 128, 4 heads of 32, vocab 512
    assert c["params"] == 2 * 512 * 128 + 2 * (4 * 128 * 128 + 8 * 128 * 128)
    assert c["steps"] == 24 and c["tokens"] == 24 * 4096 and c["tokens_per_s"] > 0 and c["wall_s"] > 0
    assert c["mfu"] is None  # no peak-FLOPs figure for a CPU
    out = Path(res.uri)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 5.5 and losses[-1] < losses[0] - 1.0, losses  # ln(512) = 6.24 at init
    assert c["final_val_loss"] < losses[0] - 1.0
    assert 0.5 < c["val_bpb"] < 5 and c["final_train_loss"] == pytest.approx(losses[-1])
    for f in ("final/model.safetensors", "final/meta.json", "samples.json", "plan.json", "checkpoints/step_000024/optimizer.pt"):
        assert f in m["files"], f
    samples = json.loads((out / "samples.json").read_text())
    assert {s["prompt"] for s in samples} == set(cfg.pretrain.sample_prompts) and all(s["completion"] for s in samples)

    model, meta = load_model(res.uri)
    assert meta["step"] == 24 and model.num_params() == c["params"]
    assert len(list(model.generate([1, 2, 3], 5, temperature=0.0))) == 5

    # MLflow: params, per-step metrics and val metrics in one run (file store from conftest)
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(m["mlflow_run_id"])
    assert run.data.params["train.total_batch_tokens"] == "4096" and run.data.params["plan.steps"] == "24"
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"} <= set(run.data.metrics)
    assert run.info.status == "FINISHED"

    # the same config again is a cache hit
    assert execute("pretrain", cfg, inputs, progress=False).cached
