"""`kiln ls`: the artifact root read back as a catalogue (status, verify, lineage), local and on S3."""

from __future__ import annotations

import json
import os
from pathlib import Path

from s3_server import moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

from llm.cli.ls import lineage, list_outputs
from llm.cli.main import main
from llm.stages.output import run_stage
from llm.storage import Store


def _stage(text: str, counts: dict):
    def fn(out, inputs):
        out.path("data/part.txt").write_text(text)
        return {"counts": counts}

    return fn


def _chain(root: str) -> dict[str, str]:
    """download -> filter -> tokenize, with a relative input URI like a run started in another directory."""
    store = Store(root)
    d = run_stage(store, "download", {"s": 1}, {}, "1", _stage("raw", {"files": 2, "rows": 100}))
    f = run_stage(store, "filter", {}, {"docs": d.uri}, "1", _stage("kept", {"docs_in": 100, "docs_out": 60}))
    t = run_stage(store, "tokenize", {}, {"docs": f.uri, "docs_again": d.uri}, "1",
                  _stage("tok", {"tokens": 1234, "docs": 60}))
    return {"download": d.uri, "filter": f.uri, "tokenize": t.uri}


def test_lists_outputs_with_status_counts_and_unfinished_work(artifact_root: Path, capsys):
    uris = _chain(str(artifact_root))
    crashed = artifact_root / "pretrain" / "0123456789abcdef0123.partial"
    crashed.mkdir(parents=True)
    (crashed / "checkpoints.bin").write_bytes(b"x" * 10)

    entries = list_outputs(Store(str(artifact_root)), str(artifact_root))
    by_stage = {e.stage: e for e in entries}
    assert set(by_stage) == {"download", "filter", "tokenize", "pretrain"}
    assert entries[-1].stage == "pretrain" and entries[-1].status == "partial"  # unfinished last
    assert [e.status for e in entries[:-1]] == ["ok"] * 3
    assert by_stage["filter"].counts == {"docs_in": 100, "docs_out": 60}
    assert by_stage["tokenize"].inputs == {"docs": uris["filter"], "docs_again": uris["download"]}
    assert by_stage["pretrain"].key == "0123456789abcdef0123"
    assert [e.stage for e in list_outputs(Store(str(artifact_root)), str(artifact_root), stage="filter")] == ["filter"]

    assert main(["ls", "--root", str(artifact_root)]) == 0
    out = capsys.readouterr().out
    assert "docs_in=100 docs_out=60" in out and "tokens=1,234" in out
    assert "4 outputs" in out and "3 ok, 1 unfinished, 0 damaged" in out


def test_damage_is_found_and_named(artifact_root: Path, capsys):
    uris = _chain(str(artifact_root))
    # Same size, other bytes: only a re-hash sees it.
    (Path(uris["filter"]) / "data" / "part.txt").write_text("KEPT")
    store = Store(str(artifact_root))
    assert {e.stage: e.status for e in list_outputs(store, str(artifact_root))}["filter"] == "ok"
    verified = {e.stage: e for e in list_outputs(store, str(artifact_root), verify=True)}
    assert verified["filter"].status == "corrupt"
    assert verified["filter"].problem == "data/part.txt: content differs from its recorded sha256"
    # A missing file is seen without re-hashing, and the CLI exits non-zero naming the output.
    os.remove(Path(uris["download"]) / "data" / "part.txt")
    assert main(["ls", "--root", str(artifact_root)]) == 1
    out = capsys.readouterr().out
    assert f"{uris['download']}: data/part.txt: listed in the manifest but missing" in out
    # A manifest that is not JSON is reported, not fatal to the listing.
    (Path(uris["tokenize"]) / "manifest.json").write_text("{not json")
    entries = {e.stage: e for e in list_outputs(store, str(artifact_root))}
    assert entries["tokenize"].status == "broken" and "corrupt manifest" in entries["tokenize"].problem


def test_lineage_follows_inputs_even_when_recorded_relative(artifact_root: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uris = _chain("./artifacts")  # recorded as ./artifacts/...: meaningless from another directory
    monkeypatch.chdir(artifact_root.parent.parent)
    root = str(artifact_root)
    tok = str(artifact_root / "tokenize" / Path(uris["tokenize"]).name)
    chain = lineage(Store(root), tok, root=root)
    labels = [(depth, label.split(":")[0]) for depth, label, _ in chain]
    assert labels == [(0, tok), (1, "docs"), (2, "docs"), (1, "docs_again")]
    assert chain[2][2]["stage"] == "download" and "(above)" in chain[3][1]  # shared upstream shown once

    assert main(["ls", "--root", root, "--lineage", tok, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in rows] == ["tokenize", "filter", "download", None]
    assert main(["ls", "--root", root, "--lineage", str(artifact_root / "nope")]) == 1


def test_lists_an_s3_root(s3_bucket):
    root = f"{s3_bucket.uri}/runs"
    _chain(root)
    entries = list_outputs(Store(root), root)
    assert sorted(e.stage for e in entries) == ["download", "filter", "tokenize"]
    assert all(e.status == "ok" and e.uri.startswith(root) for e in entries)
    # A truncated object on S3 is seen from the listing alone.
    victim = next(e for e in entries if e.stage == "filter")
    key = f"{victim.uri[len(s3_bucket.uri) + 1:]}/data/part.txt"
    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key=key, Body=b"ke")
    damaged = {e.stage: e for e in list_outputs(Store(root), root)}["filter"]
    assert damaged.status == "corrupt" and damaged.problem == "data/part.txt: 2 bytes, the manifest says 4"


def test_cli_refuses_an_unknown_stage_and_a_missing_root(artifact_root: Path, tmp_path: Path, capsys):
    assert main(["ls", "--root", str(artifact_root), "--stage", "pretrian"]) == 2
    assert "unknown stage 'pretrian'" in capsys.readouterr().err
    assert main(["ls", "--root", str(tmp_path / "nowhere")]) == 1
    assert "no artifact root at" in capsys.readouterr().err
