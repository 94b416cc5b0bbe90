"""The `kiln` command as a user meets it: help text, and bad input as one clear line before any compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.cli import main as kiln


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
