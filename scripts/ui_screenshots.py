"""Screenshots of the Prefect flow-run graph and the MLflow run tree, from headless Chromium.

    source .stack/env                              # a running `kiln stack up`
    .venv/bin/python scripts/ui_screenshots.py --out docs/screenshots [--flow-run ID]

Uses Playwright with the system's Chromium (Debian: `apt-get install -y chromium`), so no browser
download is needed. Without ``--flow-run`` it picks the newest ``full-pipeline`` flow run.
Writes ``prefect_flow_run_graph.png`` and ``mlflow_run_tree.png`` (and prints their paths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run",
                 "--disable-component-update", "--disable-sync", "--metrics-recording-only"]


def _post(url: str, body: dict) -> object:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - the stack's own API
        return json.loads(r.read())


def newest_pipeline_run(api: str) -> dict:
    runs = _post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["full-pipeline"]}}, "sort": "START_TIME_DESC",
                                             "limit": 1})
    if not runs:
        raise SystemExit("no full-pipeline flow run found: run `prefect deployment run full-pipeline/tiny` first")
    return runs[0]


def mlflow_experiment_url(mlflow: str, name: str) -> str:
    req = urllib.request.Request(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
        exp_id = json.loads(r.read())["experiment"]["experiment_id"]
    return f"{mlflow}/#/experiments/{exp_id}/runs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefect-ui", default=os.environ.get("PREFECT_UI_URL", "http://127.0.0.1:4200"))
    p.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL", ""))
    p.add_argument("--mlflow", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    p.add_argument("--experiment", default="kiln")
    p.add_argument("--flow-run", default="", help="flow run id (default: the newest full-pipeline run)")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--out", default="docs/screenshots")
    p.add_argument("--wait-ms", type=int, default=6000, help="time for the pages' data to load")
    a = p.parse_args(argv)
    api = a.prefect_api or f"{a.prefect_ui.rstrip('/')}/api"
    if not Path(a.chromium).exists():
        raise SystemExit(f"{a.chromium} not found: apt-get install -y chromium (or pass --chromium)")
    if a.flow_run:
        with urllib.request.urlopen(f"{api}/flow_runs/{a.flow_run}", timeout=30) as r:  # noqa: S310
            flow_run = json.loads(r.read())
    else:
        flow_run = newest_pipeline_run(api)
    flow_run_id = flow_run["id"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # Prefect: the flow run page shows its graph (tasks and child flow runs) on top.
        page.goto(f"{a.prefect_ui.rstrip('/')}/runs/flow-run/{flow_run_id}", wait_until="load")
        page.wait_for_timeout(a.wait_ms)
        shots.append(out / "prefect_flow_run_graph.png")
        page.screenshot(path=str(shots[-1]))
        # MLflow: the experiment's runs table groups child runs under their parent.
        page.goto(mlflow_experiment_url(a.mlflow.rstrip("/"), a.experiment), wait_until="load")
        page.wait_for_timeout(a.wait_ms)
        for label in ("Got it", "Close"):  # first-visit tips and side panels of newer MLflow UIs
            btn = page.get_by_role("button", name=label)
            if btn.count():
                btn.first.click()
                page.wait_for_timeout(500)
        # Expand this pipeline's parent run (named <preset>-<flow run name>) to show its stage runs.
        row = page.get_by_role("row").filter(has_text=f"-{flow_run['name']}")
        if row.count() and row.first.get_by_role("button").count():
            row.first.get_by_role("button").first.click()
            page.wait_for_timeout(2000)
        shots.append(out / "mlflow_run_tree.png")
        page.screenshot(path=str(shots[-1]), full_page=True)
        browser.close()
    for s in shots:
        print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
