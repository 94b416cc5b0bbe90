"""Artifact roots that move, get copied, or are used from another directory.

A stage reads its inputs from where the user (or the chain) pointed, not from the path an input's
manifest recorded when it was made; manifests record paths relative to their artifact root, so a
whole root can be moved or copied and still works; old manifests (absolute or ``./artifacts/...``
paths) stay readable. One small real chain (download → pretrain, tiny sizes) is run once on the
default relative root ``./artifacts`` and then moved away; each test works on its own copy.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from s3_server import moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

from llm.cli.ls import lineage, list_outputs
from llm.cli.main import main as kiln
from llm.stages.output import run_stage
from llm.storage import Store

# A chain that runs in seconds on 2 cores: one small shard, a 512-token BPE, 2 training steps.
CHAIN = ["download.max_files=1", "download.max_rows=300", "filter.workers=1", "dedup.workers=1",
         "tokenizer.vocab_size=512", "tokenizer.max_train_chars=2000000", "tokenize.workers=1",
         "pretrain.steps=2", "pretrain.eval_every=2", "pretrain.eval_tokens=4096", "pretrain.ckpt_every=2"]
EVAL = ["eval.max_per_task=1", "eval.tasks=[hellaswag]", "eval.bpb_tokens=2048", "eval.sample_max_tokens=2",
        "eval.device=cpu", "eval.nproc=1"]
DATA_STAGES = ("download", "filter", "dedup", "tokenizer", "tokenize")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A finished download → pretrain root, made as ``./artifacts`` in a directory that is then gone."""
    run_dir = tmp_path_factory.mktemp("first-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setenv("KILN_DATA_MIRROR", str(shared_data))
        mp.setenv("OMP_NUM_THREADS", "1")
        assert kiln(["run", "--until", "pretrain", "--quiet", "--set", *CHAIN]) == 0
    kept = tmp_path_factory.mktemp("kept") / "artifacts"
    shutil.move(str(run_dir / "artifacts"), kept)
    shutil.rmtree(run_dir)
    return kept


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _place(pristine: Path, dest: Path) -> Path:
    shutil.copytree(pristine, dest)
    return dest


def _key(root: Path, stage: str) -> str:
    (key,) = [p.name for p in (root / stage).iterdir() if (p / "manifest.json").is_file()]
    return key


def _raw_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _corrupt(path: Path) -> None:
    """Flip bytes in the middle: same size, so only a content check can tell."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def test_eval_scores_the_checkpoint_it_was_given_not_the_one_its_manifest_names(
        pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "project"
    root = _place(pristine, project / "artifacts")
    copy = tmp_path / "elsewhere" / "copy-of-pretrain"
    shutil.copytree(root / "pretrain" / _key(root, "pretrain"), copy)
    _corrupt(copy / "final" / "model.safetensors")
    monkeypatch.chdir(project)  # the original is at ./artifacts/pretrain/<key>, where the copy's manifest points

    rc = kiln(["eval", "--checkpoint", str(copy), "--quiet", "--set", *CHAIN, *EVAL])

    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"{copy / 'final' / 'model.safetensors'}: SHA-256 mismatch" in err, err
    assert "Traceback" not in err
    assert not (root / "eval").exists() or not any((root / "eval").glob("*/manifest.json"))


def test_a_moved_root_runs_a_downstream_stage_from_another_directory(
        pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    new = _place(pristine, tmp_path / "moved" / "art")
    before = _key(new, "pretrain")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    # Another step count: a new pretrain output that reads the moved tokenize output, found by key.
    rc = kiln(["pretrain", "--output", str(new), "--quiet", "--set", *CHAIN, "pretrain.steps=3"])

    assert rc == 0, capsys.readouterr().err
    (key,) = [p.name for p in (new / "pretrain").iterdir() if p.name != before]
    m = _raw_manifest(new / "pretrain" / key)
    assert m["counts"]["steps"] == 3
    # Recorded relative to the root, so this root can move again.
    assert m["uri"] == f"pretrain/{key}"
    assert m["inputs"]["tokens"]["uri"] == f"tokenize/{_key(new, 'tokenize')}"
    assert m["inputs"]["tokenizer"]["uri"] == f"tokenizer/{_key(new, 'tokenizer')}"
    assert not (tmp_path / "cwd" / "artifacts").exists()  # nothing written to the default root


def test_chat_finds_the_tokenizer_of_a_moved_root_from_another_directory(
        pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    new = _place(pristine, tmp_path / "moved" / "art")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))

    rc = kiln(["chat", "--checkpoint", str(new / "pretrain" / _key(new, "pretrain")), "--device", "cpu"])

    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"tokenizer {new / 'tokenizer' / _key(new, 'tokenizer')}" in err, err


def test_summary_final_uri_is_the_published_final(pristine: Path) -> None:
    out = pristine / "pretrain" / _key(pristine, "pretrain")
    summary = json.loads((out / "summary.json").read_text())
    assert ".partial" not in summary["final_uri"]
    assert (out / summary["final_uri"] / "meta.json").is_file()


def _lineage_uris(root: Path) -> list[str]:
    """Where each output on the way back from the pretrain output was read from."""
    chain = lineage(Store(str(root)), str(root / "pretrain" / _key(root, "pretrain")), root=str(root))
    return [m["uri"] for _, _, m in chain if m is not None]


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_lineage_of_a_moved_or_copied_root_walks_that_root(
        how: str, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "project"
    project.mkdir()
    if how == "copied":  # the original stays where the manifests' old spelling, ./artifacts, finds it
        _place(pristine, project / "artifacts")
    new = _place(pristine, tmp_path / "other" / "art")
    monkeypatch.chdir(project)

    uris = _lineage_uris(new)
    assert len(uris) == 6 and all(u.startswith(f"{new}/") for u in uris), uris
    assert kiln(["ls", "--root", str(new), "--lineage", str(new / "pretrain" / _key(new, "pretrain")), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in rows if r["stage"]] == ["pretrain", "tokenizer", "dedup", "filter", "download",
                                                          "tokenize"]
    listed = {e.stage: e for e in list_outputs(Store(str(new)), str(new))}
    assert listed["tokenize"].inputs["docs"] == str(new / "dedup" / _key(new, "dedup"))


def _make_legacy(root: Path, prefix: str) -> None:
    """Rewrite every manifest as an older Kiln wrote it: paths as the run spelled them (``prefix``)."""
    for mf in root.glob("*/*/manifest.json"):
        m = json.loads(mf.read_text())
        m.pop("paths", None)
        m["uri"] = f"{prefix}/{mf.parent.parent.name}/{mf.parent.name}"
        for inp in (m.get("inputs") or {}).values():
            inp["uri"] = f"{prefix}/" + "/".join(inp["uri"].split("/")[-2:])
        mf.write_text(json.dumps(m, indent=2, sort_keys=True))


@pytest.mark.parametrize("prefix", ["./artifacts", "/gone/away/artifacts"])
def test_old_manifests_in_a_moved_root_still_resolve(
        prefix: str, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    new = _place(pristine, tmp_path / "moved" / "art")
    _make_legacy(new, prefix)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    uris = _lineage_uris(new)
    assert len(uris) == 6 and all(u.startswith(f"{new}/") for u in uris), uris
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    assert kiln(["chat", "--checkpoint", str(new / "pretrain" / _key(new, "pretrain")), "--device", "cpu"]) == 0
    assert f"tokenizer {new / 'tokenizer' / _key(new, 'tokenizer')}" in capsys.readouterr().err


def _writer(text: str):
    def fn(out, inputs):
        out.path("x.txt").write_text(text)
        return {"counts": {}}

    return fn


def test_manifest_paths_are_relative_inside_the_root_and_absolute_outside(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    outside = run_stage(Store("elsewhere"), "a", {}, {}, "1", _writer("far"))
    store = Store("./artifacts")
    inside = run_stage(store, "a", {"n": 1}, {}, "1", _writer("near"))
    b = run_stage(store, "b", {}, {"near": inside.uri, "far": outside.uri}, "1", _writer("b"))

    m = _raw_manifest(Path(b.uri))
    assert m["uri"] == f"b/{Path(b.uri).name}"
    assert m["inputs"]["near"]["uri"] == f"a/{Path(inside.uri).name}"
    assert m["inputs"]["far"]["uri"] == str(tmp_path / "elsewhere" / "a" / Path(outside.uri).name)
    # Read back, every path is where the files are now, whatever the current directory.
    monkeypatch.chdir(tmp_path.parent)
    again = run_stage(Store(str(tmp_path / "artifacts")), "b", {}, {"near": str(tmp_path / inside.uri),
                                                                   "far": str(tmp_path / outside.uri)}, "1",
                      _writer("b"))
    assert again.cached
    assert again.manifest["uri"] == str(tmp_path / "artifacts" / "b" / Path(b.uri).name)
    assert again.manifest["inputs"]["near"]["uri"] == str(tmp_path / "artifacts" / "a" / Path(inside.uri).name)


def test_a_local_root_synced_to_s3_is_read_there(tmp_path: Path, s3_bucket) -> None:  # noqa: F811
    local = tmp_path / "artifacts"
    a = run_stage(Store(str(local)), "a", {}, {}, "1", _writer("a"))
    b = run_stage(Store(str(local)), "b", {}, {"x": a.uri}, "1", _writer("b"))
    root = f"{s3_bucket.uri}/synced"
    Store(root).put_dir(local, root)
    shutil.rmtree(local)
    s3 = Store(root)
    at_a, at_b = f"{root}/a/{Path(a.uri).name}", f"{root}/b/{Path(b.uri).name}"

    assert [m["uri"] for _, _, m in lineage(s3, at_b, root=root) if m] == [at_b, at_a]
    seen: dict[str, str] = {}

    def reads_upstream(out, inputs):
        seen["b"], seen["a"] = inputs["y"]["uri"], inputs["y"]["inputs"]["x"]["uri"]
        return _writer("c")(out, inputs)

    c = run_stage(s3, "c", {}, {"y": at_b}, "1", reads_upstream)
    assert seen == {"b": at_b, "a": at_a}
    m = json.loads(s3.get_bytes(f"{c.uri}/manifest.json"))
    assert (m["uri"], m["inputs"]["y"]["uri"]) == (f"c/{Path(c.uri).name}", f"b/{Path(b.uri).name}")
