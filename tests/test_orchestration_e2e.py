"""The whole tiny pipeline under a real local stack: Prefect server + MLflow server + cpu/gpu workers.

One module-scoped scenario, asserted from several angles:

1. ``kiln stack up`` (loopback, random ports, state in tmp) deploys the ``tiny`` deployments.
2. ``full-pipeline/tiny`` runs with ``use_deployments`` (training/eval as child flow runs on the gpu
   pool) and ``orchestration.fail_once=[midtrain]``: the midtrain child fails (a StageError, not
   retried) and the parent fails with the child's error.
3. ``prefect flow-run retry <id>`` reruns it: the stages before midtrain are ``Cached`` and their
   outputs untouched; midtrain and everything after it are computed.
4. A second run with the same parameters finishes with every stage ``Cached`` and starts no child runs.
5. The MLflow run tree is read back with MlflowClient; ``sft/tiny`` runs alone from the CLI.

Small on purpose (tiny model, a few steps, 2 CORE tasks × 2 examples); the time goes to process
start-up, which is what this test is about.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

LABELS = ["download", "filter", "dedup", "tokenizer", "tokenize", "pretrain", "midtrain", "sft",
          "eval_pretrain", "eval_midtrain", "eval_sft", "export", "report"]
BEFORE_FAILURE = ["download", "filter", "dedup", "tokenizer", "tokenize", "pretrain", "eval_pretrain"]
FROM_FAILURE = ["midtrain", "sft", "eval_midtrain", "eval_sft", "export", "report"]
# The stages the first (failing) attempt must have finished, midtrain failing.
FIRST_ATTEMPT = ["download", "filter", "dedup", "tokenizer", "tokenize", "pretrain", "midtrain"]

TINY = {
    "download.max_rows": 300, "tokenizer.vocab_size": 512, "model.seq_len": 128, "chat_data.max_rows": 300,
    "pretrain.steps": 6, "pretrain.device_batch_size": 4, "pretrain.total_batch_tokens": 512,
    "pretrain.eval_every": 1000, "pretrain.eval_tokens": 1024,
    "midtrain.steps": 3, "midtrain.device_batch_size": 4, "midtrain.total_batch_tokens": 512,
    "midtrain.eval_every": 1000, "midtrain.eval_tokens": 1024,
    "sft.steps": 3, "sft.device_batch_size": 4, "sft.total_batch_tokens": 512, "sft.max_conversation_tokens": 128,
    "sft.eval_every": 1000, "sft.eval_tokens": 1024,
    "eval.max_per_task": 2, "eval.tasks": ["hellaswag_zeroshot", "arc_easy"], "eval.bpb_tokens": 2048,
    "eval.sample_max_tokens": 4,
}


# --------------------------------------------------------------------------- helpers


class Api:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One API call; 503 (SQLite busy) and connection errors are retried, like Prefect's own client."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(6):
            req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    raw = r.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                if e.code != 503 or attempt == 5:
                    raise
            except urllib.error.URLError:
                if attempt == 5:
                    raise
            time.sleep(2 ** attempt)

    def flow_run(self, fid: str) -> dict:
        return self.call("GET", f"/flow_runs/{fid}")

    def wait(self, fid: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            fr = self.flow_run(fid)
            if fr["state"] and fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return fr
            time.sleep(2)
        raise AssertionError(f"flow run {fid} still {self.flow_run(fid)['state']} after {timeout}s")

    def task_runs(self, fid: str) -> list[dict]:
        return self.call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [fid]}}, "limit": 200})

    def flow_runs(self) -> list[dict]:
        return self.call("POST", "/flow_runs/filter", {"limit": 200})

    def run_deployment(self, name: str, parameters: dict) -> str:
        dep = self.call("GET", f"/deployments/name/{name}")
        return self.call("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})["id"]

    def artifacts(self, fid: str) -> list[dict]:
        return self.call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [fid]}}})


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def stage_states(api: Api, fid: str, expect: list[str], since: str | None = None,
                 timeout: float = 120) -> dict[str, str]:
    """label -> state name of the stage task runs of a flow run (created after ``since``, if given).

    Prefect 3 records task-run states from events that the flow's process sends in the background,
    while the flow run's own final state is set by a direct API call: the task runs can lag the flow
    run. So read until every label in ``expect`` has a task run in a final state; after ``timeout``
    return what is there, for the caller's assertion to show.
    """
    deadline = time.time() + timeout
    while True:
        out: dict[str, str] = {}
        final: dict[str, bool] = {}
        for tr in sorted(api.task_runs(fid), key=lambda t: t["created"]):
            if tr["name"] in LABELS and (since is None or tr["created"] > since):
                state = tr["state"] or {}
                out[tr["name"]] = state.get("name")
                final[tr["name"]] = state.get("type") in FINAL
        if all(final.get(label) for label in expect) or time.time() > deadline:
            return out
        time.sleep(1)


def manifest_started(uri: str) -> float:
    return json.loads((Path(uri) / "manifest.json").read_text())["timings"]["started"]


def cli(env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- the scenario


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("e2e")
    home = base / "stack"
    env = {**os.environ, "KILN_CACHE": str(base / "kiln-cache"), "HF_HOME": str(base / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PREFECT_HOME": str(base / "prefect-client")}
    up = subprocess.run([str(BIN / "kiln"), "stack", "up", "--home", str(home), "--prefect-port", "0",
                         "--mlflow-port", "0", "--deploy", "tiny", "--poll-seconds", "1", "--data-mirror",
                         str(shared_data), "--timeout", "300"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
    try:
        assert up.returncode == 0, f"kiln stack up failed:\n{up.stdout}\n{up.stderr}"
        info = json.loads((home / "stack.json").read_text())
        env.update(info["env"])
        yield {"home": home, "base": base, "env": env, "api": Api(info["env"]["PREFECT_API_URL"]),
               "mlflow": info["mlflow_ui"], "prefect_ui": info["prefect_ui"]}
    finally:
        if os.environ.get("KILN_E2E_KEEP_STACK") != "1":  # keep it to look around (kiln stack down --home ...)
            subprocess.run([str(BIN / "kiln"), "stack", "down", "--home", str(home)], cwd=REPO, env=env,
                           capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def scenario(stack):
    api: Api = stack["api"]
    base: Path = stack["base"]
    overrides = {**TINY, "run.artifact_root": str(base / "artifacts"),
                 "orchestration.result_storage": str(base / "prefect-results"),
                 "orchestration.use_deployments": True, "orchestration.poll_interval_s": 1,
                 "orchestration.fail_once": ["midtrain"], "run.mlflow_experiment": "kiln-e2e"}
    params = {"preset": "tiny", "overrides": overrides}
    out: dict[str, Any] = {"overrides": overrides}

    run1 = api.run_deployment("full-pipeline/tiny", params)
    out["run1"] = run1
    out["run1_first"] = api.wait(run1, 1200)
    out["run1_states_first"] = stage_states(api, run1, expect=FIRST_ATTEMPT)

    retry_at = api.flow_run(run1)["updated"]
    out["retry_at_epoch"] = time.time()
    retry = cli(stack["env"], "flow-run", "retry", run1, timeout=300)
    assert retry.returncode == 0, f"prefect flow-run retry failed:\n{retry.stdout}\n{retry.stderr}"
    time.sleep(3)
    out["run1_final"] = api.wait(run1, 1200)
    out["run1_states_retry"] = stage_states(api, run1, expect=LABELS, since=retry_at)
    out["uris"] = _uris_from_mlflow(stack, run1)

    n_before = len(api.flow_runs())
    run2 = api.run_deployment("full-pipeline/tiny", params)
    out["run2"] = run2
    out["run2_final"] = api.wait(run2, 600)
    out["run2_states"] = stage_states(api, run2, expect=LABELS)
    out["new_flow_runs"] = len(api.flow_runs()) - n_before
    return out


def _uris_from_mlflow(stack, flow_run_id: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack["mlflow"])
    exp = client.get_experiment_by_name("kiln-e2e")
    children = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}' "
                                  "and tags.`kiln.kind` = 'stage'")
    return {r.data.tags["kiln.stage_label"]: r.data.tags.get("kiln.output_uri", "") for r in children}


# --------------------------------------------------------------------------- assertions


@pytest.mark.timeout(3000)
def test_child_failure_fails_the_parent_with_the_childs_error(scenario):
    first = scenario["run1_first"]
    assert first["state"]["type"] == "FAILED", first["state"]
    msg = first["state"]["message"] or ""
    assert "midtrain" in msg and "injected failure" in msg, msg
    states = scenario["run1_states_first"]
    for label in FIRST_ATTEMPT[:-1]:
        assert states.get(label) == "Completed", (label, states)
    assert states.get("midtrain") == "Failed", states
    assert "sft" not in states  # nothing after the failure started


def test_flow_run_retry_reruns_only_the_failed_stage_and_what_follows(scenario):
    final = scenario["run1_final"]
    assert final["state"]["type"] == "COMPLETED", final["state"]
    states = scenario["run1_states_retry"]
    assert set(states) == set(LABELS), states
    for label in BEFORE_FAILURE:
        assert states[label] == "Cached", (label, states)
    for label in FROM_FAILURE:
        assert states[label] == "Completed", (label, states)
    # And on disk: outputs before the failure were not rewritten; the rest were written by the retry.
    uris, t = scenario["uris"], scenario["retry_at_epoch"]
    for label in BEFORE_FAILURE:
        assert manifest_started(uris[label]) < t, label
    for label in FROM_FAILURE:
        assert manifest_started(uris[label]) > t - 5, label


def test_second_run_is_all_cached_and_starts_no_children(scenario):
    assert scenario["run2_final"]["state"]["type"] == "COMPLETED", scenario["run2_final"]["state"]
    states = scenario["run2_states"]
    assert states == {label: "Cached" for label in LABELS}, states
    assert scenario["new_flow_runs"] == 1  # the pipeline itself; no stage deployment was started


def test_mlflow_run_tree(scenario, stack):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack["mlflow"])
    exp = client.get_experiment_by_name("kiln-e2e")
    parents = {r.data.tags["prefect.flow_run_id"]: r for r in
               client.search_runs([exp.experiment_id], "tags.`kiln.kind` = 'pipeline'")}
    p1, p2 = parents[scenario["run1"]], parents[scenario["run2"]]
    # One parent per pipeline run (the retry reused it), tagged for navigation and provenance.
    assert p1.info.status == "FINISHED" and p1.data.tags["kiln.retries"] == "1"
    assert p1.data.tags["kiln.preset"] == "tiny"
    assert p1.data.tags["prefect.flow_run_url"].startswith(stack["prefect_ui"])
    assert scenario["run1"] in p1.data.tags["prefect.flow_run_url"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", p1.data.tags["mlflow.source.git.commit"])

    def children(parent):
        runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        return {r.data.tags["kiln.stage_label"]: r for r in runs}

    c1, c2 = children(p1), children(p2)
    assert set(c1) == set(LABELS) and set(c2) == set(LABELS)
    assert all(r.info.status == "FINISHED" for r in c1.values()), {k: r.info.status for k, r in c1.items()}
    # Per-stage content: config params, manifest counts as metrics, output URI.
    assert c1["filter"].data.params["cfg.filter.workers"]
    assert c1["download"].data.metrics["docs_out"] == 300
    assert c1["report"].data.tags["kiln.output_uri"].startswith(str(stack["base"] / "artifacts" / "report"))
    # Training curves streamed from the torchrun job into the stage's own child run.
    assert len(client.get_metric_history(c1["pretrain"].info.run_id, "loss")) >= 1
    manifest = json.loads((Path(c1["pretrain"].data.tags["kiln.output_uri"]) / "manifest.json").read_text())
    assert manifest["mlflow_run_id"] == c1["pretrain"].info.run_id
    # Cached stages of the second run say so, and name the run that computed them.
    for label in LABELS:
        tags = c2[label].data.tags
        assert tags["kiln.cached"] == "true", label
        assert tags["kiln.reused_from_run_id"] == c1[label].info.run_id, label
    # The report is in MLflow (parent run) and a Prefect markdown artifact; a link artifact points at MLflow.
    assert "report.md" in [f.path for f in client.list_artifacts(p1.info.run_id)]
    arts = {a["key"]: a for a in stack["api"].artifacts(scenario["run1"]) if a.get("key")}
    assert arts["kiln-report"]["type"] == "markdown" and len(arts["kiln-report"]["data"]) > 100
    # (Prefect stores a link artifact as a markdown link.)
    link = arts["kiln-mlflow-run"]["data"]
    assert re.fullmatch(rf"\[.+\]\({re.escape(stack['mlflow'])}/#/experiments/\d+/runs/{p1.info.run_id}\)", link), link


def test_stage_deployment_runs_alone_from_the_cli(scenario, stack):
    overrides = {k: v for k, v in scenario["overrides"].items() if k != "orchestration.fail_once"}
    res = cli(stack["env"], "deployment", "run", "sft/tiny", "--param", f"overrides={json.dumps(overrides)}",
              "--watch", timeout=600)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    fid = re.search(r"UUID: ([0-9a-f-]{36})", res.stdout).group(1)
    assert stack["api"].flow_run(fid)["state"]["type"] == "COMPLETED"
    assert stage_states(stack["api"], fid, expect=["sft"]) == {"sft": "Cached"}


@pytest.mark.timeout(3000)
def test_changing_only_the_sft_config_recomputes_only_sft_and_what_follows(scenario, stack):
    api: Api = stack["api"]
    overrides = {k: v for k, v in scenario["overrides"].items() if k != "orchestration.fail_once"}
    overrides["sft.lr"] = 1e-4  # the tiny preset's is 2e-3
    fid = api.run_deployment("full-pipeline/tiny", {"preset": "tiny", "overrides": overrides})
    final = api.wait(fid, 900)
    assert final["state"]["type"] == "COMPLETED", final["state"]
    states = stage_states(api, fid, expect=LABELS)
    recomputed = {"sft", "eval_sft", "export", "report"}  # export reads the SFT model and its eval
    assert {label for label, s in states.items() if s != "Cached"} == recomputed, states
    assert {states[label] for label in LABELS if label not in recomputed} == {"Cached"}, states
