"""Screenshot of the MLflow 3 UI's Models tab with Kiln's logged models, from headless Chromium.

    KILN_DATA_MIRROR=/path/to/data-kit .venv/bin/python scripts/mlflow_models_screenshot.py \
        --out docs/screenshots/mlflow_models.png

Self-contained and real end to end: it runs the tiny pipeline (``kiln run --preset tiny`` with the
SMALL overrides below: download → … → pretrain → midtrain → sft → CORE eval and bpb of each model →
export → report) into a fresh ``--work`` directory (default /tmp/mlshot), tracking to a sqlite MLflow
store there. Every value on the page is measured by that run: each training stage's final checkpoint
is a LoggedModel, each eval logs its measured CORE and bpb against it with the evaluation data's
digests, and the export registers the sft model as ``kiln-tiny`` (alias ``current``). The script
prints those values from the stage manifests, to compare with the picture. Then it starts ``mlflow
server --backend-store-uri sqlite:///…`` on 127.0.0.1 (a free port), opens
``/#/experiments/<id>/models`` in the system Chromium (``apt-get install -y chromium``) via
Playwright, wide enough for the metric columns, and saves the page. The server is stopped at the end.
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
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from ui_screenshots import CHROMIUM_ARGS  # noqa: E402

EXPERIMENT = "kiln-tiny-models"
# The tiny preset made smaller still (minutes on 2 shared cores), as tests/test_orchestration_e2e.py's
# TINY does, with a longer pretrain and more CORE items per task so the scores are not all noise.
SMALL = {
    "download.max_rows": 300, "tokenizer.vocab_size": 512, "model.seq_len": 128, "chat_data.max_rows": 300,
    "pretrain.steps": 60, "pretrain.device_batch_size": 4, "pretrain.total_batch_tokens": 512,
    "pretrain.eval_every": 1000, "pretrain.eval_tokens": 1024,
    "midtrain.steps": 6, "midtrain.device_batch_size": 4, "midtrain.total_batch_tokens": 512,
    "midtrain.eval_every": 1000, "midtrain.eval_tokens": 1024,
    "sft.steps": 6, "sft.device_batch_size": 4, "sft.total_batch_tokens": 512, "sft.max_conversation_tokens": 128,
    "sft.eval_every": 1000, "sft.eval_tokens": 1024,
    "eval.max_per_task": 8, "eval.bpb_tokens": 8192, "eval.sample_max_tokens": 4,
}


def populate(work: Path) -> tuple[str, str]:
    """A real tiny ``kiln run`` tracking to a sqlite store in ``work``; returns (tracking uri, experiment id)."""
    from mlflow.tracking import MlflowClient

    if not os.environ.get("KILN_DATA_MIRROR"):
        raise SystemExit("set KILN_DATA_MIRROR to the offline data kit (the tiny run reads it instead of the hub)")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    sets = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in SMALL.items()]
    sets += [f"run.mlflow_tracking_uri={uri}", f"run.mlflow_experiment={EXPERIMENT}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "5"}
    env.pop("KILN_MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "llm.cli", "run", "--preset", "tiny", "--output", str(work / "artifacts"),
           "--quiet", "--set", *sets]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    # cwd: a sqlite store keeps its artifacts in ./mlruns
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    (work / "run.log").write_text(res.stdout + res.stderr)
    if res.returncode:
        raise SystemExit(res.stdout[-3000:] + res.stderr[-3000:])
    print(f"kiln run: {time.time() - t0:.0f} s", flush=True)
    print_measured(work / "artifacts")
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT)
    return uri, exp.experiment_id


def print_measured(root: Path) -> None:
    """The measured CORE and bpb of each evaluated model, from the eval stage manifests, and what the
    export registered: what the Models tab must show."""
    for manifest in sorted(root.glob("eval/*/manifest.json")) + sorted(root.glob("export/*/manifest.json")):
        m = json.loads(manifest.read_text())
        counts = m.get("counts") or {}
        extra = f" registered {m['mlflow_registered']}" if m.get("mlflow_registered") else ""
        model = ((m.get("inputs") or {}).get("model") or {}).get("uri", "")  # <stage>/<key>, root-relative
        print(f"{m['stage']} {m['key']} (of {model}): {m.get('core_label', 'CORE')} {counts.get('core')}, "
              f"bpb {counts.get('bpb')}{extra}", flush=True)


def show_summary_columns(page) -> None:
    """Hide the per-task CORE metrics (``core_acc/<task>``, ``core_centered/<task>``: forty columns) and
    "Logged from" in the table's Columns menu, so that CORE and bpb fit on one screen next to the models."""
    import re

    page.get_by_role("button", name="Columns").first.click()
    page.wait_for_timeout(1000)
    node = page.locator("[class*=tree-treenode]", has_text="Dataset: core_eval")
    node.locator("[class*=tree-switcher]").first.click()  # expand the CORE dataset's metrics
    page.wait_for_timeout(1000)
    per_task = page.locator("[class*=tree-title]", has_text=re.compile(r"^core_(acc|centered)/"))
    for _ in range(500):
        checked = page.locator("[class*=tree-treenode-checkbox-checked]", has=per_task)
        if not checked.count():
            break
        checked.first.locator("[class*=tree-checkbox]").first.click()
    page.locator("[class*=tree-treenode]", has_text="Logged from").locator("[class*=tree-checkbox]").first.click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(1000)


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
    p.add_argument("--width", type=int, default=2200)
    p.add_argument("--height", type=int, default=520)
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
            # Wide: the Models table puts the metric columns (CORE, bpb, the losses) after the model, run
            # and dataset columns (the per-task CORE columns are hidden, see show_summary_columns).
            page = browser.new_page(viewport={"width": a.width, "height": a.height})
            page.goto(f"{base}/#/experiments/{exp_id}/models", wait_until="load")
            mode = page.get_by_text("Model training", exact=True)  # MLflow 3.x: the classic ML view of the tab
            try:
                mode.first.wait_for(timeout=60000)  # (a loaded machine renders the switch late)
            except Exception:  # noqa: BLE001 - an MLflow without the switch: already the classic view
                pass
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
            show_summary_columns(page)
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
