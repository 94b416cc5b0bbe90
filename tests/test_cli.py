"""The `kiln` command as a user meets it: help text, and bad input as one clear line before any compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.cli.main import main as kiln


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.startswith("kiln: "), err
    for n in needles:
        assert n in err, err
    return err


def test_chat_on_a_directory_that_is_no_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kiln(["chat", "--checkpoint", str(tmp_path)]) == 1
    _one_line_error(capsys, str(tmp_path), "no checkpoint")


def test_ls_lineage_of_a_corrupt_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "download" / "k"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{not json")
    assert kiln(["ls", "--root", str(tmp_path), "--lineage", str(out)]) == 1
    _one_line_error(capsys, "manifest.json", "corrupt")


def _published(root: Path, stage: str) -> str:
    """A finished output of ``stage`` (any files): enough for input checks."""
    from llm.stages.output import run_stage
    from llm.storage import Store

    def write(out, inputs):
        out.path("x.txt").write_text(stage)
        return {"counts": {}}

    return run_stage(Store(str(root)), stage, {}, {}, "1", write).uri


def test_an_input_from_the_wrong_stage_is_named(artifact_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = _published(artifact_root, "tokenizer")
    rc = kiln(["tokenize", "--output", str(artifact_root), "--input", f"docs={tok}", "--input", f"tokenizer={tok}"])
    assert rc == 1
    _one_line_error(capsys, "tokenize input 'docs'", tok, "tokenizer output", "download, filter or dedup")


def test_a_bad_explicit_input_fails_before_upstream_compute(artifact_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln tokenize --input docs=BAD` must not first run download → tokenizer to fill the other role."""
    missing = artifact_root / "nope"
    rc = kiln(["tokenize", "--output", str(artifact_root), "--set", "download.max_files=1",
               "--set", "download.max_rows=50", "--input", f"docs={missing}"])
    assert rc == 1
    _one_line_error(capsys, "tokenize input 'docs'", str(missing))
    assert not any(artifact_root.iterdir()), "an upstream stage ran before the bad input was reported"


def test_summary_leads_with_headline_counts_and_rounds_floats() -> None:
    """A reused output's manifest has its counts in alphabetical order; the summary still shows
    the same headline counts as a fresh run (and as `kiln ls`), with floats a person can read."""
    from llm.cli.main import summary
    from llm.stages.output import StageResult

    counts = {"final_train_loss": 7.753876765569051, "final_val_loss": 7.226579427719116, "mfu": 0.0012345678,
              "params": 1441792, "steps": 10, "tokens": 40960, "tokens_per_s": 812.6230507268997,
              "val_bpb": 3.006785653295301, "wall_s": 50.40467405319214}
    r = StageResult(uri="/r/pretrain/k", manifest={"stage": "pretrain", "counts": counts, "timings": {"seconds": 1.0}},
                    cached=True)
    text = summary({"pretrain": r}, 1.0)
    assert "steps=10" in text and "tokens=40,960" in text and "final_val_loss=7.227" in text
    assert "7.226579427719116" not in text and "812.6230507268997" not in text


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        kiln([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_says_what_each_command_reads(capsys: pytest.CaptureFixture[str]) -> None:
    top = _help(capsys)
    for name in ("chat", "stack", "ls"):
        line = next(ln for ln in top.splitlines() if ln.strip().startswith(name + " "))
        assert "--help" not in line, line  # a real one-line description, not "see `kiln chat --help`"
    download = _help(capsys, "download")
    assert "download.source" in download and "--input" not in download  # it has no upstream
    report = _help(capsys, "report")
    assert "Inputs: none" not in report and "ROLE=URI" in report
    for name in ("run", "config", "chat", "ls", "stack"):
        text = _help(capsys, name)
        usage_end = text.index("\n\n")
        assert text[usage_end:].strip().split("\n")[0] not in ("options:", "positional arguments:"), f"{name}: no description"


def test_plan_prints_the_token_plan_without_running_anything(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert kiln(["plan", "--preset", "d20", "--nproc", "8", "--gpu", "H100", "--json"]) == 0
    plans = {p["stage"]: p for p in json.loads(capsys.readouterr().out)}
    pre = plans["pretrain"]
    # nanochat's speedrun shape: ~561M params (477M of them block matrices + lm_head), 12 tokens per
    # scaling param (nanochat's D:N), 524,288 tokens per step on 8 GPUs.
    assert pre["params"] == 560_988_160 and pre["scaling_params"] == 477_102_080 and pre["grad_accum"] == 1
    assert pre["tokens"] == pre["steps"] * 524_288 >= 12 * pre["scaling_params"] > (pre["steps"] - 1) * 524_288
    assert 1 * 3600 < pre["estimate"]["seconds"] < 3 * 3600  # 8 × H100 at the assumed 40% MFU
    assert "steps known once it is rendered" in plans["sft"]["budget"]
    assert not list(tmp_path.iterdir())  # nothing downloaded, nothing written

    # tiny: the same numbers `make run` trains with (150 steps, 614,400 tokens, 1,441,792 params)
    assert kiln(["plan", "--preset", "tiny", "--stage", "pretrain", "--json"]) == 0
    (tiny,) = json.loads(capsys.readouterr().out)
    assert (tiny["params"], tiny["steps"], tiny["tokens"]) == (1_441_792, 150, 614_400)

    # A batch that does not divide over the GPUs is the trainer's own error, before any compute.
    assert kiln(["plan", "--preset", "d20", "--nproc", "3", "--stage", "pretrain"]) == 1
    assert "not a multiple of device_batch_size 32 × seq_len 2048 × world_size 3" in capsys.readouterr().out
    assert kiln(["plan", "--preset", "d20", "--gpu", "TPU"]) == 2
    assert "no peak-FLOPs entry for GPU 'TPU'" in capsys.readouterr().err
