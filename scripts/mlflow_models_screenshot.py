"""Screenshot of the MLflow 3 UI's Models tab with Kiln's logged models, from headless Chromium.

    .venv/bin/python scripts/mlflow_models_screenshot.py --out docs/screenshots/mlflow_models.png

Self-contained: it fills a fresh sqlite MLflow store (``--work``, default /tmp/mlshot) through Kiln's
own code path, as tests/test_export.py's MLflow test does: two tiny real training runs
(``python -m llm.train.trainer``, 4 steps, named pretrain and sft) each log their final checkpoint as a
LoggedModel; ``llm.eval.stage._log_mlflow`` logs CORE and bpb against each (the test's fixed values,
not a measured eval: the kit's CORE bundle isn't needed); the export stage registers the sft model as
``kiln-tiny`` with alias ``current``. Then it starts ``mlflow server`` on 127.0.0.1 (a free port), opens
``/#/experiments/<id>/models`` in the system Chromium (``apt-get install -y chromium``) via Playwright,
and saves the page. The server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "scripts")]

from ui_screenshots import CHROMIUM_ARGS  # noqa: E402

EXPERIMENT = "kiln-tiny-models"


def populate(work: Path) -> tuple[str, str]:
    """Real tiny training runs + eval metrics + registry entry; returns (tracking uri, experiment id)."""
    from mlflow.tracking import MlflowClient
    from train_fixtures import tiny_job, write_token_shards

    from llm.config import load_config
    from llm.data.tokenizer import train_tokenizer
    from llm.eval.stage import _log_mlflow
    from llm.stages.output import run_stage
    from llm.stages.registry import execute
    from llm.storage import Store
    from llm.tokenizer import HF_TOKENIZER_FILE

    uri = f"sqlite:///{work / 'mlflow.db'}"
    artifact_root = work / "artifacts"
    artifact_root.mkdir(parents=True)
    os.chdir(work)  # a sqlite store keeps its artifacts in ./mlruns
    tok, hf = train_tokenizer(["the cat sat on the mat, and the dog sat on the log."] * 40, 300)

    def tokenizer_fn(out, inputs):
        tok.save(out.workdir)
        hf.save(str(out.path(HF_TOKENIZER_FILE)))
        return {"counts": {"vocab_size": tok.vocab_size}}

    tok_uri = run_stage(Store(str(artifact_root)), "tokenizer", {"t": 2}, {}, "shot", tokenizer_fn).uri
    shards = write_token_shards(work / "shards", vocab=tok.vocab_size, n_docs=60, val_docs=10)
    cfg = load_config("tiny", [f"run.artifact_root={artifact_root}", f"run.mlflow_tracking_uri={uri}",
                               f"run.mlflow_experiment={EXPERIMENT}"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    env.pop("KILN_MLFLOW_RUN_ID", None)
    finals = {}
    for stage, (core, bpb) in {"pretrain": (0.25, 2.5), "sft": (0.31, 2.4)}.items():
        job = tiny_job(shards, work / stage, steps=4, eval_every=4, ckpt_every=4)
        job["model"]["vocab_size"] = tok.vocab_size
        job["stage"] = stage  # the LoggedModel's name
        job["mlflow"] = {"enabled": True, "tracking_uri": uri, "experiment": EXPERIMENT, "run_name": stage}
        (work / f"{stage}.json").write_text(json.dumps(job))
        res = subprocess.run([sys.executable, "-m", "llm.train.trainer", "--job", str(work / f"{stage}.json")],
                             env=env, capture_output=True, text=True, timeout=600)
        if res.returncode:
            raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
        finals[stage] = str(work / stage / "final")
        result = {"core": core, "label": "CORE-subset-1", "missing": [], "n_tasks": 1, "bundle": "/kit/core_eval",
                  "bundle_fingerprint": "c0" * 32, "tasks": {"arc_easy": {"centered": core, "accuracy": 0.4375}}}
        _log_mlflow(cfg, stage, result, {"bpb": bpb}, work, {
            "model": {"uri": finals[stage], "hash": "m0" * 10, "stage": "checkpoint", "counts": {}},
            "tokens": {"uri": str(shards), "hash": "70" * 10, "stage": "tokenize", "counts": {}}})
    execute("export", cfg, {"model": finals["sft"], "tokenizer": tok_uri}, progress=False)
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT)
    return uri, exp.experiment_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/mlshot", help="scratch dir (emptied first)")
    p.add_argument("--out", default="docs/screenshots/mlflow_models.png")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--wait-ms", type=int, default=8000)
    p.add_argument("--reuse", action="store_true", help="screenshot an already filled --work store")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    if not Path(a.chromium).exists():
        raise SystemExit(f"{a.chromium} not found: apt-get install -y chromium (or pass --chromium)")
    work = Path(a.work)
    if a.reuse:
        from mlflow.tracking import MlflowClient

        uri = f"sqlite:///{work / 'mlflow.db'}"
        exp_id = MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT).experiment_id
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        uri, exp_id = populate(work)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", uri, "--default-artifact-root",
                               str(work / "mlruns"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):  # noqa: S310 - loopback
                    break
            except OSError:
                time.sleep(1)
        else:
            raise SystemExit("mlflow server did not come up: " + (work / "server.log").read_text()[-2000:])
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 2000, "height": 600})
            page.goto(f"{base}/#/experiments/{exp_id}/models", wait_until="load")
            page.wait_for_timeout(3000)
            mode = page.get_by_text("Model training", exact=True)  # MLflow 3.x: the classic ML view of the tab
            if mode.count():
                mode.first.click()  # (it lands on Runs: back to the Models tab, now in this view)
                page.wait_for_timeout(2000)
                page.goto(f"{base}/#/experiments/{exp_id}/models", wait_until="load")
            try:
                page.get_by_text("pretrain", exact=True).first.wait_for(timeout=60000)
            except Exception as e:  # noqa: BLE001 - still save what rendered, to look at
                print(f"model names not seen: {e}", file=sys.stderr)
            page.wait_for_timeout(a.wait_ms)
            for label in ("Got it", "Close"):  # first-visit tips of newer MLflow UIs
                btn = page.get_by_role("button", name=label)
                if btn.count():
                    btn.first.click()
                    page.wait_for_timeout(500)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
