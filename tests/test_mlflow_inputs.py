"""Data lineage in MLflow: every stage's child run lists the upstream outputs it read as MLflow
dataset inputs (name = producing stage, digest = manifest hash, source = output URI, context =
how the stage used it), computed or cached alike; the trainer's own run does the same.

Stage outputs here are hand-made ``<root>/<stage>/<key>/manifest.json`` files: the tracking code
only reads manifests, so no stage has to run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

KEYS = {s: f"{i:02d}" + "ab" * 9 for i, s in enumerate(
    ["download", "filter", "dedup", "tokenizer", "tokenize", "pretrain", "eval"])}


def _publish(root: Path, stage: str, inputs: dict[str, str], counts: dict[str, Any], hash_: str,
             key: str | None = None) -> dict[str, Any]:
    """Write a stage output's manifest; returns the summary the flow's stage task would hand back."""
    key = key or KEYS[stage]
    out = root / stage / key
    out.mkdir(parents=True, exist_ok=True)
    recorded = {}
    for role, uri in inputs.items():
        recorded[role] = {"uri": uri, "hash": json.loads((Path(uri) / "manifest.json").read_text())["hash"]}
    manifest = {"stage": stage, "key": key, "uri": str(out), "hash": hash_, "inputs": recorded,
                "counts": counts, "files": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return {"stage": stage, "uri": str(out), "key": key, "hash": hash_, "counts": counts, "seconds": 0.5,
            "reused": False, "mlflow_run_id": None, "flow_run_id": None}


@pytest.fixture()
def outputs(artifact_root: Path) -> dict[str, dict[str, Any]]:
    """A small chain of finished outputs: download → filter → dedup → tokenizer → tokenize → pretrain → eval."""
    r = artifact_root
    s: dict[str, dict[str, Any]] = {}
    s["download"] = _publish(r, "download", {}, {"docs_out": 400}, "d0" * 10)
    s["filter"] = _publish(r, "filter", {"docs": s["download"]["uri"]}, {"docs_in": 400, "docs_out": 300}, "f1" * 10)
    s["dedup"] = _publish(r, "dedup", {"docs": s["filter"]["uri"]}, {"docs_in": 300, "docs_out": 280}, "dd" * 10)
    s["tokenizer"] = _publish(r, "tokenizer", {"docs": s["dedup"]["uri"]}, {"vocab_size": 4096}, "7a" * 10)
    s["tokenize"] = _publish(r, "tokenize", {"docs": s["dedup"]["uri"], "tokenizer": s["tokenizer"]["uri"]},
                             {"tokens_train": 90_000, "tokens_val": 9_000}, "70" * 10)
    s["pretrain"] = _publish(r, "pretrain", {"tokens": s["tokenize"]["uri"], "tokenizer": s["tokenizer"]["uri"]},
                             {"steps": 20, "final_val_loss": 5.5}, "9e" * 10)
    s["eval"] = _publish(r, "eval", {"model": s["pretrain"]["uri"], "tokenizer": s["tokenizer"]["uri"],
                                     "tokens": s["tokenize"]["uri"]}, {"core": 0.01}, "e0" * 10)
    return s


def _cfg(artifact_root: Path, tracking_uri: str):
    from llm.config import load_config

    return load_config("tiny", {"run.artifact_root": str(artifact_root), "run.mlflow_tracking_uri": tracking_uri})


def _inputs(client, run_id: str) -> dict[str, dict[str, Any]]:
    """{dataset name: {digest, source_type, uri, profile, tags}} as the MLflow client reads them back."""
    got = {}
    for di in client.get_run(run_id).inputs.dataset_inputs:
        ds = di.dataset
        got[ds.name] = {"digest": ds.digest, "source_type": ds.source_type, "uri": json.loads(ds.source)["uri"],
                        "profile": json.loads(ds.profile) if ds.profile else None,
                        "tags": {t.key: t.value for t in di.tags}}
    return got


@pytest.fixture(params=["file", "sqlite"])
def tracking_uri(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The file store (the ./mlruns default) and a database store (what an MLflow server uses)."""
    # A database store without a server puts artifacts under ./mlruns of the working directory:
    # run from tmp so a test never writes into the checkout (where a later `make run` would trip on it).
    monkeypatch.chdir(tmp_path)
    return f"file://{tmp_path / 'mlruns'}" if request.param == "file" else f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_stage_child_runs_list_their_upstream_outputs_as_datasets(outputs, artifact_root, tracking_uri):
    from mlflow.tracking import MlflowClient

    from tasks.tracking_tasks import PipelineTracker

    cfg = _cfg(artifact_root, tracking_uri)
    tracker = PipelineTracker.start(cfg, params={"preset": "tiny"})
    runs = {}
    for label, stage in [("download", "download"), ("tokenize", "tokenize"), ("pretrain", "pretrain"),
                         ("eval_pretrain", "eval")]:
        runs[label] = tracker.stage_start(label, stage)
        tracker.stage_done(label, stage, outputs[stage], prefect_cached=False)
    tracker.finish(ok=True)
    c = MlflowClient(tracking_uri=tracking_uri)

    assert _inputs(c, runs["download"]) == {}  # a source stage reads no stage output
    assert _inputs(c, runs["tokenize"]) == {
        "dedup": {"digest": outputs["dedup"]["hash"], "source_type": "local", "uri": outputs["dedup"]["uri"],
                  "profile": {"docs_in": 300, "docs_out": 280},
                  "tags": {"mlflow.data.context": "source", "kiln.role": "docs"}},
        "tokenizer": {"digest": outputs["tokenizer"]["hash"], "source_type": "local",
                      "uri": outputs["tokenizer"]["uri"], "profile": {"vocab_size": 4096},
                      "tags": {"mlflow.data.context": "tokenizer", "kiln.role": "tokenizer"}},
    }
    pre = _inputs(c, runs["pretrain"])
    assert set(pre) == {"tokenize", "tokenizer"}
    assert pre["tokenize"]["digest"] == outputs["tokenize"]["hash"]
    assert pre["tokenize"]["tags"] == {"mlflow.data.context": "training", "kiln.role": "tokens"}
    ev = _inputs(c, runs["eval_pretrain"])
    assert {n: (d["digest"], d["tags"]["mlflow.data.context"]) for n, d in ev.items()} == {
        "pretrain": (outputs["pretrain"]["hash"], "evaluated_model"),
        "tokenize": (outputs["tokenize"]["hash"], "evaluation"),
        "tokenizer": (outputs["tokenizer"]["hash"], "tokenizer"),
    }
    # The stage's own output: the digest its consumers' inputs carry, on its run's tags.
    assert c.get_run(runs["pretrain"]).data.tags["kiln.manifest_hash"] == ev["pretrain"]["digest"]
    # Lineage lives on the stage runs, not on the pipeline's parent run.
    assert _inputs(c, tracker.run_id) == {}


def test_a_cached_stage_still_shows_its_inputs(outputs, artifact_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.tracking_tasks import PipelineTracker

    cfg = _cfg(artifact_root, f"file://{tmp_path / 'ml'}")
    first = PipelineTracker.start(cfg, params={"preset": "tiny"})
    computed = first.stage_start("filter", "filter")
    first.stage_done("filter", "filter", outputs["filter"], prefect_cached=False)
    first.finish(ok=True)
    runs = {}
    for level, summary, prefect_cached in [("manifest", {**outputs["filter"], "reused": True}, False),
                                           ("prefect", outputs["filter"], True)]:
        again = PipelineTracker.start(cfg, params={"preset": "tiny"})
        runs[level] = again.stage_start("filter", "filter")
        again.stage_done("filter", "filter", summary, prefect_cached=prefect_cached)
        again.finish(ok=True)
    c = MlflowClient(tracking_uri=cfg.run.mlflow_tracking_uri)
    want = _inputs(c, computed)
    assert want["download"]["digest"] == outputs["download"]["hash"]
    for level, run_id in runs.items():
        tags = c.get_run(run_id).data.tags
        assert tags["kiln.cached"] == "true" and tags["kiln.cache_level"] == level
        assert tags["kiln.reused_from_run_id"] == computed
        assert _inputs(c, run_id) == want


def test_the_digest_is_what_the_output_was_made_from(outputs, artifact_root, tmp_path):
    """An upstream output rewritten since (forced, different bytes) does not change what a
    finished stage says it read: its manifest's recorded hash is the digest."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking_tasks import PipelineTracker

    up = Path(outputs["dedup"]["uri"]) / "manifest.json"
    m = json.loads(up.read_text())
    up.write_text(json.dumps({**m, "hash": "0f" * 10, "counts": {"docs_out": 1}}))
    cfg = _cfg(artifact_root, f"file://{tmp_path / 'ml'}")
    tracker = PipelineTracker.start(cfg, params={"preset": "tiny"})
    run_id = tracker.stage_start("tokenizer", "tokenizer")
    tracker.stage_done("tokenizer", "tokenizer", outputs["tokenizer"], prefect_cached=False)
    got = _inputs(MlflowClient(tracking_uri=cfg.run.mlflow_tracking_uri), run_id)
    assert got == {"dedup": {"digest": outputs["dedup"]["hash"], "source_type": "local",
                             "uri": outputs["dedup"]["uri"], "profile": None,  # counts of other bytes: left out
                             "tags": {"mlflow.data.context": "training", "kiln.role": "docs"}}}


def test_trainer_run_logs_its_inputs_once_into_the_stage_run(outputs, artifact_root, tmp_path, monkeypatch):
    """The trainer (llm.tracking) resolves its input URIs through their manifests; in a pipeline it
    logs into the stage's child run first, and the flow's later logging adds nothing twice."""
    from mlflow.tracking import MlflowClient

    from llm.tracking import read_stage_inputs, start_tracker
    from tasks.tracking_tasks import PipelineTracker

    uri = f"file://{tmp_path / 'ml'}"
    cfg = _cfg(artifact_root, uri)
    c = MlflowClient(tracking_uri=uri)

    # Alone (`kiln pretrain`): a run of its own; a tokenizer that is no stage output is left out.
    monkeypatch.delenv("KILN_MLFLOW_RUN_ID", raising=False)
    found = read_stage_inputs({"tokens": outputs["tokenize"]["uri"], "tokenizer": "tiktoken:gpt2",
                               "model": None, "missing": str(artifact_root / "nowhere")})
    assert list(found) == ["tokens"]
    alone = start_tracker(tracking_uri_=uri, experiment="kiln-alone", run_name="pretrain")
    alone.log_inputs("pretrain", found)
    alone.end()
    got = _inputs(c, alone.run_id)
    assert list(got) == ["tokenize"] and got["tokenize"]["tags"]["mlflow.data.context"] == "training"
    assert got["tokenize"]["profile"] == {"tokens_train": 90_000, "tokens_val": 9_000}

    # In a pipeline: into the child run while training, then the flow's stage_done.
    tracker = PipelineTracker.start(cfg, params={"preset": "tiny"})
    child = tracker.stage_start("pretrain", "pretrain")
    monkeypatch.setenv("KILN_MLFLOW_RUN_ID", child)
    job = start_tracker(tracking_uri_=uri, experiment=cfg.run.mlflow_experiment)
    assert job.run_id == child
    job.log_inputs("pretrain", read_stage_inputs({"tokens": outputs["tokenize"]["uri"],
                                                  "tokenizer": outputs["tokenizer"]["uri"]}))
    while_training = _inputs(c, child)
    tracker.stage_done("pretrain", "pretrain", outputs["pretrain"], prefect_cached=False)
    assert len(c.get_run(child).inputs.dataset_inputs) == 2
    assert _inputs(c, child) == while_training
    assert set(while_training) == {"tokenize", "tokenizer"}


def test_dataset_inputs_name_sources_and_collisions():
    """S3 outputs get an s3 source; a checkpoint inside a training output is named by that stage;
    two roles reading the same output stay two inputs."""
    from llm.tracking import dataset_inputs, upstream_stage

    assert upstream_stage("s3://b/kiln/pretrain/" + KEYS["pretrain"] + "/checkpoints/step_000020") == "pretrain"
    assert upstream_stage("/data/somewhere/model") is None
    same = "s3://b/kiln/tokenize/" + KEYS["tokenize"]
    items = dataset_inputs("eval", {"tokens": {"uri": same, "hash": "70" * 10},
                                    "extra": {"uri": same, "hash": "70" * 10},
                                    "model": {"uri": "/data/ckpt/step_5", "hash": "c0" * 10}})
    got = {i.dataset.name: (i.dataset.source_type, json.loads(i.dataset.source)["uri"], i.dataset.digest)
           for i in items}
    assert got == {"tokenize/tokens": ("s3", same, "70" * 10), "tokenize/extra": ("s3", same, "70" * 10),
                   "model": ("local", "/data/ckpt/step_5", "c0" * 10)}
