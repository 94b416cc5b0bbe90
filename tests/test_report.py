"""The report card from hand-made manifests: every section, PNG loss curves, "not run" for absent stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.config import load_config
from llm.report import render_report, run
from llm.stages.output import StageOutput
from llm.storage import Store


def _stage(root: Path, name: str, counts: dict, files: dict[str, str] | None = None, **extra) -> dict:
    d = root / name
    d.mkdir(parents=True)
    for rel, text in (files or {}).items():
        (d / rel).write_text(text)
    return {"stage": name.split("_")[0], "key": f"k-{name}", "uri": str(d), "counts": counts,
            "files": {rel: {"size": 1, "sha256": "x"} for rel in (files or {})},
            "timings": {"seconds": 12.0}, "host": {"hostname": "box", "platform": "linux"}, **extra}


@pytest.fixture()
def manifests(tmp_path: Path) -> dict[str, dict]:
    metrics = "".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "loss": 8.3, "lr": 0.0, "tokens": 0},
        {"step": 10, "loss": 6.1, "tokens": 40960},
        {"step": 20, "loss": 5.2, "val_loss": 5.4, "val_bpb": 1.9},
        {"step": 30, "loss": 4.9, "val_loss": 5.0, "val_bpb": 1.8},
    ]) + '{"step": 40, "loss"'  # torn last line of a crashed writer: ignored
    core = {"core": 0.05, "label": "CORE-20 (squad, coqa missing)", "n_tasks": 2, "examples": 32, "seconds": 3.0,
            "tasks": {"copa": {"accuracy": 0.6, "centered": 0.2, "n": 16},
                      "hellaswag": {"accuracy": 0.25, "centered": -0.1, "n": 16}},
            "missing": ["squad", "coqa"],
            "comparison": [{"task": "copa", "ours": 0.2, "gpt2": 0.2, "gpt2-xl": 0.5},
                           {"task": "hellaswag", "ours": -0.1, "gpt2": 0.077209, "gpt2-xl": 0.4},
                           {"task": "CORE-20 (squad, coqa missing)", "ours": 0.05, "gpt2": 0.1386, "gpt2-xl": 0.45}]}
    root = tmp_path / "art"
    return {
        "download": _stage(root, "download", {"docs_in": 1000, "docs_out": 1000, "files": 2}),
        "filter": _stage(root, "filter", {"docs_in": 1000, "docs_out": 700, "removed": 300},
                         removed_by_rule={"gopher_quality": 200, "c4": 100},
                         examples_per_rule={"c4": [{"id": "x", "text": "lorem ipsum"}]}),
        "dedup": _stage(root, "dedup", {"docs_in": 700, "docs_out": 630, "exact_dups": 20, "near_dups": 50,
                                        "removal_rate": 0.1}),
        "tokenizer": _stage(root, "tokenizer", {"vocab_size": 4096, "chars_per_token": 3.9}),
        "tokenize": _stage(root, "tokenize", {"tokens": 1_234_567, "docs": 630}),
        "pretrain": _stage(root, "pretrain", {"params": 1_500_000, "tokens": 614_400, "steps": 150, "wall_s": 3600.0,
                                              "tokens_per_s": 170.7, "mfu": 0.012, "final_train_loss": 4.9,
                                              "final_val_loss": 5.0, "val_bpb": 1.8},
                           {"metrics.jsonl": metrics}),
        "eval_pretrain": _stage(root, "eval_pretrain", {"core": 0.05, "wall_s": 60.0, "ranks": 1}, {
            "core.json": json.dumps(core),
            "bpb.json": json.dumps({"bpb": 1.85, "tokens": 32768}),
            "samples.json": json.dumps([{"prompt": "The tallest mountain in the world is", "completion": " the the | the"}]),
        }),
    }


def test_report_renders_every_section_and_a_png(manifests, tmp_path: Path):
    cfg = load_config("tiny", {"report.gpu_type": "H100"})
    md = render_report(cfg, manifests, tmp_path / "plots")
    for heading in ("## Environment", "## Data", "## Tokenizer", "## Training", "## Evaluation", "## Cost estimate"):
        assert heading in md
    assert "git commit: `" in md and "torch " in md
    assert "| filter | 1,000 | 700 | 300 |" in md
    assert "Filter — removed by rule:" in md and "| gopher_quality | 200 |" in md and "| c4 | 100 |" in md
    assert "Duplicate rate (dedup): **0.1**" in md
    assert "| bpe | 4,096 | 3.9 |" in md
    # training: pretrain numbers, midtrain/sft explicitly not run
    assert "| pretrain | 1,500,000 | 614,400 | 150 | 60.0 min |" in md
    assert "| midtrain |" in md and md.count("_not run_") >= 2
    # eval: CORE table with GPT-2 references, the 20-task caveat, bpb, samples
    assert "| copa | 0.2 | 0.2 | 0.5 |" in md
    assert "| **CORE-20 (squad, coqa missing)** | 0.05 | 0.1386 | 0.45 |" in md
    assert "not comparable with published 22-task CORE" in md
    assert "| pretrain | 1.85 | 32,768 |" in md
    assert "*The tallest mountain in the world is* →  the the \\| the" in md
    # cost: 1 h pretrain + 1 min eval on one H100 at $2.99
    assert "1.017 H100-hours" in md and "$3.04" in md
    png = tmp_path / "plots" / "loss_pretrain.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![pretrain loss](loss_pretrain.png)" in md


def test_report_of_an_empty_run_says_not_run(tmp_path: Path):
    md = render_report(load_config("tiny"), {}, tmp_path)
    assert "CORE / bpb / samples: _not run_" in md and "Tokenizer: _not run_" in md
    assert not list(tmp_path.glob("*.png"))


def test_report_stage_writes_report_md(manifests, tmp_path: Path):
    cfg = load_config("tiny", {"run.artifact_root": str(tmp_path / "art")})
    work = tmp_path / "work"
    work.mkdir()
    out = StageOutput(store=Store(str(tmp_path / "art")), stage="report", key="k", uri=str(tmp_path / "r"), workdir=work)
    res = run(cfg, out, manifests, progress=False)
    assert res["plots"] == ["loss_pretrain.png"] and res["counts"]["plots"] == 1
    assert (work / "report.md").read_text().startswith("# Kiln run report: tiny")


def test_report_warns_when_stages_were_scored_on_different_bundles(manifests, tmp_path: Path):
    core_path = Path(manifests["eval_pretrain"]["uri"]) / "core.json"
    core = json.loads(core_path.read_text())
    core_path.write_text(json.dumps({**core, "bundle": "/kit/core_eval", "bundle_fingerprint": "a" * 64}))
    md = render_report(load_config("tiny"), manifests, tmp_path / "plots")
    assert f"content sha256 `{'a' * 16}`" in md and "Warning" not in md

    second = _stage(tmp_path / "art2", "eval_sft", {"core": 0.04, "wall_s": 60.0, "ranks": 1}, {
        "core.json": json.dumps({**core, "bundle_fingerprint": "b" * 64}), "bpb.json": "{}"})
    md = render_report(load_config("tiny"), {**manifests, "eval_sft": second}, tmp_path / "plots")
    assert "**Warning:** the stages were scored on different bundle contents" in md


def test_report_says_how_many_tokens_carried_loss(manifests, tmp_path: Path):
    sft_counts = {"params": 1_500_000, "tokens": 81_920, "supervised_tokens": 20_480, "steps": 40, "wall_s": 30.0,
                  "tokens_by_source": {"chat": 74_659, "padding": 7_261}}
    md = render_report(load_config("tiny"), {**manifests, "sft": _stage(tmp_path / "art3", "sft", sft_counts)},
                       tmp_path / "plots")
    assert "sft: 20,480 of 81,920 tokens carried loss (25.0%" in md
    training = md.split("## Training")[1].split("## Evaluation")[0]
    assert "- pretrain:" not in training  # no supervised count recorded: no line
