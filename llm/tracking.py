"""MLflow logging conventions for every Kiln job (training, eval, data stages may use it too).

Only rank 0 logs. Which run receives the logs is decided by the caller through the environment, so a
pipeline can nest stages under one parent run:

1. ``KILN_MLFLOW_RUN_ID`` set        → log into that existing run (the caller owns it; we never end it);
2. ``KILN_MLFLOW_PARENT_RUN_ID`` set → create a child run (tag ``mlflow.parentRunId``) and end it ourselves;
3. otherwise                        → a standalone run in experiment ``cfg.run.mlflow_experiment``
   (or ``resume_run_id`` when a resumed job passes the run it created before the crash).

Tracking URI: ``cfg.run.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlruns``.

Everything goes through ``MlflowClient`` with an explicit run id — no fluent global "active run" state,
so a library call can never log into somebody else's run by accident. Params are flattened with dotted
keys (``pretrain.lr``); values are truncated to MLflow's limit. Logging errors are reported once and
then ignored: losing a metric must never kill a multi-hour training run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PARAM_VALUE_MAX = 6000


def tracking_uri(configured: str = "") -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"file://{Path('mlruns').resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        # MLflow ≥ 3.7 refuses the file store unless opted in; ./mlruns is this project's documented
        # default (and what `mlflow ui --backend-store-uri ./mlruns` reads), so opt in for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"}; lists/None become their JSON text."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:PARAM_VALUE_MAX]
    return out


class NullTracker:
    """Same interface, does nothing: used on ranks > 0 and when tracking is disabled."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """Logs into one MLflow run via MlflowClient."""

    def __init__(self, *, tracking_uri_: str, experiment: str, run_name: str | None = None,
                 tags: dict[str, str] | None = None, resume_run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri_)
        self._warned = False
        self.owned = True
        given = os.environ.get("KILN_MLFLOW_RUN_ID")
        parent = os.environ.get("KILN_MLFLOW_PARENT_RUN_ID")
        if given:
            self.run_id, self.owned = given, False
        elif resume_run_id and self._run_exists(resume_run_id):
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            if parent:
                # A child lives in its parent's experiment so the MLflow UI shows it nested.
                exp_id = self.client.get_run(parent).info.experiment_id
            run_tags = dict(tags or {})
            if parent:
                run_tags["mlflow.parentRunId"] = parent
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=run_tags).info.run_id
        if tags and not self.owned:
            self.set_tags(tags)

    def _run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001
            return False

    def _guard(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - see module docstring
            if not self._warned:
                print(f"[tracking] MLflow {what} failed, continuing without it: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
                self._warned = True

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)

        def go() -> None:
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=items[i:i + 100])

        self._guard("log_params", go)

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and v == v]  # drop None and NaN
        if items:
            self._guard("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard("log_text", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        def go() -> None:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

        self._guard("set_tags", go)

    def end(self, status: str = "FINISHED") -> None:
        if self.owned:
            self._guard("end", lambda: self.client.set_terminated(self.run_id, status=status))


def start_tracker(*, rank: int = 0, enabled: bool = True, tracking_uri_: str = "", experiment: str = "kiln",
                  run_name: str | None = None, tags: dict[str, str] | None = None,
                  resume_run_id: str | None = None) -> NullTracker:
    """The tracker for this process: a real one on rank 0 when enabled, else a NullTracker.

    If MLflow cannot be reached at all, training goes on with a NullTracker and one warning.
    """
    if rank != 0 or not enabled:
        return NullTracker()
    try:
        return Tracker(tracking_uri_=tracking_uri(tracking_uri_), experiment=experiment, run_name=run_name,
                       tags=tags, resume_run_id=resume_run_id)
    except Exception as e:  # noqa: BLE001
        print(f"[tracking] MLflow unavailable ({type(e).__name__}: {e}); not tracking this run",
              file=sys.stderr, flush=True)
        return NullTracker()
