"""The MLflow run tree of a pipeline run, kept by the flow (not by the stages).

One parent run per Prefect flow run (tagged with the flow-run id and UI URL, the git commit,
the preset), one child run per stage (its config as params, its manifest counts as metrics,
its output URI as tags, its manifest as an artifact, the upstream outputs it read as MLflow
dataset inputs: llm/tracking.py's lineage convention). The stage's child run id is handed to
the stage through ``KILN_MLFLOW_RUN_ID`` (llm/tracking.py's convention), so the torchrun job
streams its training curves into the same child run.

A stage that was not computed (Prefect cache hit, or a verified output on disk) still gets
a child run, tagged ``kiln.cached=true`` and ``kiln.reused_from_run_id`` = the MLflow run
that computed it, found through a small lineage record next to the artifacts
(``<artifact_root>/_lineage/<stage>/<key>.json``).

A retried flow run (``prefect flow-run retry``) keeps its id, so it finds and reuses its
parent run and the child runs of stages that already finished instead of growing a second
tree. Every MLflow operation is llm/tracking.py's (runs named by id through ``MlflowClient``,
no global active run; this module never imports mlflow): what is kept here is only which runs
exist and what goes where, so it is safe to call from the flow while stages run in threads or
other processes.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from llm.config import KilnConfig
from llm.stages.output import located_manifest
from llm.tracking import (GIT_COMMIT_TAG, create_run, end_run, ensure_experiment, find_run, flatten, log_run_artifact,
                          log_run_metrics, log_run_params, log_run_text, log_stage_inputs, mlflow_client,
                          mlflow_run_url, numeric_leaves, read_stage_inputs, reopen_run, set_run_tags)
from llm.tracking import tracking_uri as llm_tracking_uri
from llm.stages.registry import STAGES
from llm.storage import Store, join

PIPELINE_TAG = "kiln.kind"
FLOW_RUN_TAG = "prefect.flow_run_id"


def tracking_uri(cfg: KilnConfig) -> str:
    """The tracking URI for this config, resolved exactly as the torchrun jobs resolve it."""
    return llm_tracking_uri(cfg.run.mlflow_tracking_uri)


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD of the code being run, with "-dirty" when tracked files differ (empty outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def lineage_uri(cfg: KilnConfig, stage: str, key: str) -> str:
    return join(cfg.run.artifact_root, "_lineage", stage, f"{key}.json")


def read_lineage(cfg: KilnConfig, stage: str, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(Store(cfg.run.artifact_root, cfg.run.s3_endpoint).get_bytes(lineage_uri(cfg, stage, key)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _parent_tags(cfg: KilnConfig, flow_run: Any, flow_run_url: str | None) -> dict[str, str]:
    """The parent run's tags: what it is, the preset, the code, and the Prefect flow run it records."""
    tags = {PIPELINE_TAG: "pipeline", "kiln.preset": cfg.preset, GIT_COMMIT_TAG: git_commit()}
    if flow_run is not None:
        tags |= {FLOW_RUN_TAG: str(flow_run.id), "prefect.flow_run_name": flow_run.name}
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    return {k: v for k, v in tags.items() if v}


class PipelineTracker:
    """The parent run of one pipeline flow run and its per-stage children."""

    def __init__(self, cfg: KilnConfig, client: Any, experiment_id: str, run_id: str, flow_run_id: str | None):
        self.cfg = cfg
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.flow_run_id = flow_run_id
        self.uri = tracking_uri(cfg)
        self.children: dict[str, str] = {}
        # Stages whose child run finished in an earlier attempt of this (retried) flow run.
        self.done_before: set[str] = set()

    # ------------------------------------------------------------------ parent
    @classmethod
    def start(cls, cfg: KilnConfig, *, params: dict[str, Any], flow_run: Any = None,
              flow_run_url: str | None = None) -> "PipelineTracker":
        client = mlflow_client(tracking_uri(cfg))
        experiment_id = ensure_experiment(client, cfg.run.mlflow_experiment)
        flow_run_id = str(flow_run.id) if flow_run is not None else None
        run_id = None
        if flow_run_id:  # a retried flow run keeps its id: reuse its parent run
            found = find_run(client, experiment_id, {FLOW_RUN_TAG: flow_run_id, PIPELINE_TAG: "pipeline"})
            if found:
                run_id = found.run_id
                reopen_run(client, run_id)
                set_run_tags(client, run_id, {"kiln.retries": int(found.tags.get("kiln.retries", "0")) + 1})
        if run_id is None:
            name = f"{cfg.preset}-{flow_run.name}" if flow_run is not None else f"{cfg.preset}-pipeline"
            run_id = create_run(client, experiment_id, tags=_parent_tags(cfg, flow_run, flow_run_url), run_name=name)
            log_run_params(client, run_id, params)
        return cls(cfg, client, experiment_id, run_id, flow_run_id)

    @property
    def url(self) -> str:
        return mlflow_run_url(self.uri, self.experiment_id, self.run_id)

    def finish(self, ok: bool, error: str | None = None) -> None:
        end_run(self.client, self.run_id, "FINISHED" if ok else "FAILED", error=error)

    # ------------------------------------------------------------------ children
    def stage_start(self, label: str, stage: str) -> str:
        """Create (or, on a retried flow run, find) the child run of one stage; returns its id."""
        found = find_run(self.client, self.experiment_id, {"kiln.stage_label": label}, parent=self.run_id)
        if found:
            run_id = found.run_id
            if found.status == "FINISHED":  # finished in an earlier attempt: keep its record as is
                self.done_before.add(label)
            else:
                reopen_run(self.client, run_id)
        else:
            run_id = create_run(self.client, self.experiment_id, run_name=label, parent=self.run_id, tags={
                PIPELINE_TAG: "stage", "kiln.stage": stage, "kiln.stage_label": label, "kiln.preset": self.cfg.preset,
            } | ({FLOW_RUN_TAG: self.flow_run_id} if self.flow_run_id else {}))
            # The full sections (operational knobs included), not just what the cache key hashes.
            config = {sec: self.cfg.section(sec) for sec in STAGES[stage].sections}
            log_run_params(self.client, run_id, flatten(config, "cfg."))
        self.children[label] = run_id
        return run_id

    def stage_done(self, label: str, stage: str, summary: dict[str, Any], prefect_cached: bool) -> None:
        """Counts as metrics, URIs as tags, the manifest as an artifact; lineage for reuse."""
        run_id = self.children[label]
        if label in self.done_before:
            return
        if summary.get("follower"):  # a multi-node follower: no output, no lineage; say what it was
            from mlflow.entities import RunTag

            self.client.log_batch(run_id, tags=[RunTag("kiln.follower", summary["follower"]),
                                                RunTag("kiln.key", summary["key"])])
            self.client.set_terminated(run_id, status="FINISHED")
            return
        cached = prefect_cached or bool(summary.get("reused"))
        tags = {
            "kiln.cached": "true" if cached else "false",
            "kiln.output_uri": summary["uri"],
            "kiln.key": summary["key"],
            "kiln.manifest_hash": summary["hash"],
        }
        if cached:
            tags |= self._reuse_tags(stage, summary, prefect_cached)
        else:
            Store(self.cfg.run.artifact_root, self.cfg.run.s3_endpoint).put_bytes(json.dumps({
                "stage": stage, "key": summary["key"], "uri": summary["uri"], "mlflow_run_id": run_id,
                "flow_run_id": self.flow_run_id, "written": time.time(),
            }).encode(), lineage_uri(self.cfg, stage, summary["key"]))
        metrics = numeric_leaves(summary.get("counts", {}))
        if summary.get("seconds") is not None and not cached:
            metrics["stage_seconds"] = float(summary["seconds"])
        log_run_metrics(self.client, run_id, metrics)
        set_run_tags(self.client, run_id, tags)
        try:
            manifest = Store(self.cfg.run.artifact_root, self.cfg.run.s3_endpoint).get_bytes(join(summary["uri"], "manifest.json"))
        except FileNotFoundError:
            manifest = None
        if manifest is not None:
            log_run_text(self.client, run_id, manifest.decode(), "manifest.json")
            # Cached or computed alike: the inputs are what the output was made from.
            self._log_inputs(run_id, stage, located_manifest(json.loads(manifest), summary["uri"]))
        end_run(self.client, run_id, "FINISHED")

    def _reuse_tags(self, stage: str, summary: dict[str, Any], prefect_cached: bool) -> dict[str, str]:
        """Where a reused output came from: the MLflow run (and flow run) that computed it."""
        origin = read_lineage(self.cfg, stage, summary["key"]) or {}
        source_run = origin.get("mlflow_run_id") or summary.get("mlflow_run_id")
        tags = {"kiln.reused_from_run_id": source_run or "unknown"}
        if origin.get("flow_run_id") or summary.get("flow_run_id"):
            tags["kiln.reused_from_flow_run_id"] = origin.get("flow_run_id") or summary.get("flow_run_id")
        tags["kiln.cache_level"] = "prefect" if prefect_cached else "manifest"
        return tags

    def _log_inputs(self, run_id: str, stage: str, manifest: dict[str, Any]) -> None:
        """The manifest's inputs as MLflow dataset inputs of the stage's child run.

        The digest is the hash this output recorded for each input (what it was really made from);
        the producing stage's name and counts come from the upstream manifest while it still has
        that hash. A failure here is reported, never raised: lineage must not fail a finished stage.
        """
        recorded = manifest.get("inputs") or {}
        try:
            now = read_stage_inputs({role: inp.get("uri") for role, inp in recorded.items()}, self.cfg.run.s3_endpoint)
            inputs = {}
            for role, inp in recorded.items():
                if not inp.get("uri") or not inp.get("hash"):
                    continue
                up = now.get(role)
                same = up is not None and up["hash"] == inp["hash"]
                inputs[role] = {"uri": inp["uri"], "hash": inp["hash"]} | (
                    {"stage": up["stage"], "counts": up["counts"]} if same else {})
            log_stage_inputs(self.client, run_id, stage, inputs)
        except Exception as e:  # noqa: BLE001
            print(f"[kiln] MLflow dataset inputs of {stage} not logged: {type(e).__name__}: {e}")

    def stage_failed(self, label: str, error: BaseException) -> None:
        run_id = self.children.get(label)
        if run_id is None:
            return
        end_run(self.client, run_id, "FAILED", error=f"{type(error).__name__}: {error}")

    # ------------------------------------------------------------------ report
    def log_report(self, report_uri: str) -> str | None:
        """Log the report stage's files to its child run and its markdown to the parent; returns the markdown."""
        store = Store(self.cfg.run.artifact_root, self.cfg.run.s3_endpoint)
        manifest = json.loads(store.get_bytes(join(report_uri, "manifest.json")))
        markdown = None
        report_run = self.children.get("report")
        for rel in sorted(manifest.get("files", {})):
            local = store.cache_path(join(report_uri, rel))
            if report_run:
                log_run_artifact(self.client, report_run, local, artifact_path=str(Path("report", rel).parent))
            if rel.endswith(".md") and (markdown is None or Path(rel).name == "report.md"):
                markdown = local.read_text()
        if markdown is not None:
            log_run_text(self.client, self.run_id, markdown, "report.md")
        return markdown
