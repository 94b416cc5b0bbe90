"""Content-addressed stage outputs: keys, verified reuse, atomic publish, crash safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.stages.output import StageError, content_key, run_stage, verify_output
from llm.storage import Store


def _writer(calls: list[int], text: str = "hello"):
    def fn(out, inputs):
        calls.append(1)
        out.path("data/a.txt").write_text(text)
        return {"counts": {"docs": 1}}

    return fn


def test_key_depends_on_config_inputs_and_code() -> None:
    base = content_key("s", {"a": 1}, {"x": "h1"}, "1")
    assert base == content_key("s", {"a": 1}, {"x": "h1"}, "1")
    assert base != content_key("s", {"a": 2}, {"x": "h1"}, "1")
    assert base != content_key("s", {"a": 1}, {"x": "h2"}, "1")
    assert base != content_key("s", {"a": 1}, {"x": "h1"}, "2")


def test_publish_then_reuse(artifact_root: Path) -> None:
    store = Store(str(artifact_root))
    calls: list[int] = []
    r1 = run_stage(store, "s", {"a": 1}, {}, "1", _writer(calls))
    r2 = run_stage(store, "s", {"a": 1}, {}, "1", _writer(calls))
    assert (r1.cached, r2.cached) == (False, True)
    assert len(calls) == 1
    m = json.loads((Path(r1.uri) / "manifest.json").read_text())
    assert m["counts"] == {"docs": 1}
    assert m["files"]["data/a.txt"]["size"] == 5
    assert len(m["files"]["data/a.txt"]["sha256"]) == 64
    assert m["host"]["hostname"]


def test_downstream_key_follows_upstream_content(artifact_root: Path) -> None:
    store = Store(str(artifact_root))
    up1 = run_stage(store, "up", {"v": 1}, {}, "1", _writer([], "one"))
    up2 = run_stage(store, "up", {"v": 2}, {}, "1", _writer([], "two"))
    d1 = run_stage(store, "down", {}, {"docs": up1.uri}, "1", _writer([]))
    d2 = run_stage(store, "down", {}, {"docs": up2.uri}, "1", _writer([]))
    assert d1.uri != d2.uri


def test_crash_leaves_nothing_that_looks_done(artifact_root: Path) -> None:
    store = Store(str(artifact_root))

    def boom(out, inputs):
        out.path("data/a.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(store, "s", {}, {}, "1", boom)
    key = content_key("s", {}, {}, "1")
    assert verify_output(store, store.uri("s", key)) is None
    assert not (artifact_root / "s" / key).exists()
    calls: list[int] = []
    assert run_stage(store, "s", {}, {}, "1", _writer(calls)).cached is False


def test_tampered_output_is_recomputed(artifact_root: Path) -> None:
    store = Store(str(artifact_root))
    r = run_stage(store, "s", {}, {}, "1", _writer([]))
    (Path(r.uri) / "data/a.txt").write_text("truncated!!")
    calls: list[int] = []
    assert run_stage(store, "s", {}, {}, "1", _writer(calls)).cached is False and calls


def test_missing_input_is_a_clear_error(artifact_root: Path) -> None:
    store = Store(str(artifact_root))
    with pytest.raises(StageError, match="input 'docs'.*not a finished stage output"):
        run_stage(store, "s", {}, {"docs": str(artifact_root / "nope")}, "1", _writer([]))


def test_identical_output_from_another_config_reuses_downstream(artifact_root: Path) -> None:
    """Content addressing: downstream keys follow the bytes an upstream stage produced, not its config."""
    store = Store(str(artifact_root))
    a = run_stage(store, "up", {"source": "/mnt/a/mirror"}, {}, "1", _writer([], "same"))
    b = run_stage(store, "up", {"source": "/data/mirror"}, {}, "1", _writer([], "same"))
    assert a.uri != b.uri and a.manifest["hash"] == b.manifest["hash"]
    calls: list[int] = []
    run_stage(store, "down", {}, {"docs": a.uri}, "1", _writer(calls))
    assert run_stage(store, "down", {}, {"docs": b.uri}, "1", _writer(calls)).cached and len(calls) == 1


@pytest.mark.parametrize("body", ['[1, 2]', '{"stage": "download"}', '{"stage": "s", "files": {"a": 3}}'])
def test_misshapen_manifest_is_a_clear_error(artifact_root: Path, body: str) -> None:
    """Valid JSON of the wrong shape (hand-edited, another tool's file) names the file, not a KeyError."""
    store = Store(str(artifact_root))
    bad = artifact_root / "download" / "k"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text(body)
    with pytest.raises(StageError, match=r"download/k/manifest.json: corrupt manifest"):
        verify_output(store, str(bad))
    with pytest.raises(StageError, match=r"corrupt manifest"):
        run_stage(store, "s", {}, {"docs": str(bad)}, "1", _writer([]))


# --------------------------------------------------------------------------- the registry is the one list of stages


def test_the_plan_is_the_registry_in_order() -> None:
    from llm.config import load_config
    from llm.stages.pipeline import plan
    from llm.stages.registry import STAGES

    cfg = load_config("tiny")
    steps = plan(cfg)
    evals = [f"eval_{m}" for m in cfg.eval.stages]
    # Registry order, a per-model stage expanded into one step per evaluated model.
    expected = [label for n, sd in STAGES.items() for label in (evals if sd.per_model else [n])]
    assert [s.label for s in steps] == expected
    assert steps[-1].inputs == {label: label for label in expected[:-1]}  # the report reads every step
    assert {s.label: s.inputs["model"] for s in steps if s.stage == "eval"} == {f"eval_{m}": m for m in cfg.eval.stages}
    assert [s.label for s in plan(cfg, until="midtrain")][-1] == "midtrain"
    assert [s.label for s in plan(cfg, until="eval")] == expected[: expected.index(evals[-1]) + 1]
    only_sft = load_config("tiny", {"eval.stages": ["sft"]})
    assert [s.label for s in plan(only_sft) if s.stage == "eval"] == ["eval_sft"]


def count_words(cfg, out, inputs, *, progress: bool) -> dict:  # noqa: ARG001 - the stage signature
    """A stage added by a test: words in its docs input."""
    import pyarrow.parquet as pq

    files = sorted(Path(inputs["docs"]["uri"]).rglob("*.parquet"))
    words = sum(len(t.split()) for f in files for t in pq.read_table(f, columns=["text"])["text"].to_pylist())
    out.path("words.json").write_text(json.dumps({"words": words}))
    return {"counts": {"words": words}}


@pytest.fixture()
def extra_stage():
    """The registry with one more stage after sft, as a new stage is added: one StageDef entry."""
    from llm.stages.registry import STAGES, StageDef

    saved = dict(STAGES)
    new = StageDef("wordcount", "test_stage:count_words", ("download",), {"docs": "download"}, headline=("words",),
                   description="count the words")
    items = list(saved.items())
    at = list(saved).index("sft") + 1
    STAGES.clear()
    STAGES.update(items[:at] + [("wordcount", new)] + items[at:])
    yield new
    STAGES.clear()
    STAGES.update(saved)


def test_a_new_stage_is_one_registry_entry(extra_stage, artifact_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In the plan after its place, read by the report, a `kiln` command that finds its inputs by
    content key (running only the steps they need), a stage name the config accepts."""
    from llm.cli.main import main as kiln
    from llm.config import load_config
    from llm.stages.pipeline import plan

    cfg = load_config("tiny", {"orchestration.force": ["wordcount"]})
    labels = [s.label for s in plan(cfg)]
    assert labels.index("wordcount") == labels.index("sft") + 1 and plan(cfg)[-1].inputs["wordcount"] == "wordcount"
    rc = kiln(["wordcount", "--output", str(artifact_root), "--quiet", "--set", "download.max_files=1",
               "download.max_rows=50"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "words=" in out and "filter" not in out
    assert sorted(p.name for p in artifact_root.iterdir()) == ["download", "wordcount"]
