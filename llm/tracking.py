"""MLflow logging conventions for every Kiln job (training, eval, data stages may use it too).

Only rank 0 logs. Which run receives the logs is decided by the caller through the environment, so a
pipeline can nest stages under one parent run:

1. ``KILN_MLFLOW_RUN_ID`` set        → log into that existing run (the caller owns it; we never end it);
2. ``KILN_MLFLOW_PARENT_RUN_ID`` set → create a child run (tag ``mlflow.parentRunId``) and end it ourselves;
3. otherwise                        → a standalone run in experiment ``cfg.run.mlflow_experiment``
   (or ``resume_run_id`` when a resumed job passes the run it created before the crash).

Tracking URI: ``cfg.run.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlruns``.

Data lineage follows MLflow's dataset convention, so the UI's "Datasets used" panel shows what a run
consumed: every upstream stage output a run reads is logged as a dataset input named after the stage
that produced it (``tokenize``, ``eval`` ...), with ``digest`` = that output's manifest hash, ``source``
= its URI (a ``local`` or ``s3`` dataset source) and the run's use of it in the ``mlflow.data.context``
input tag (``training``, ``evaluation``, ``base_model`` ...; see :func:`input_context`). One output is
thus one MLflow dataset per experiment, shared by every run that read it. MLflow 3 has no dataset
*outputs* (run outputs are logged models only), so a stage's own output is named by its run's tags
``kiln.output_uri`` and ``kiln.manifest_hash`` — the same digest its consumers' inputs carry.

Models follow MLflow 3's conventions. A training stage's final checkpoint is a ``LoggedModel``
(``models:/<model_id>``, :meth:`Tracker.log_model`) named after the stage, produced by (and an output
of) the training run, with the run's model and training params; the checkpoint's files stay where
Kiln wrote them (tag ``kiln.checkpoint_uri``), only ``meta.json`` is copied, so MLflow's store does not
hold a second copy of every weight. An eval logs CORE and bpb against that ``model_id`` and the
evaluation data's digest (the CORE bundle's fingerprint, the token shards' manifest hash), which is what
the UI's Models tab shows per model. The export stage registers the pipeline's SFT model as a version of
``kiln-<preset>`` (:func:`register_model_version`) with the lineage in its tags and the alias
``current``: MLflow reserves the alias ``latest``, and ``models:/kiln-<preset>/latest`` already means
the newest version. Training runs also log system metrics (CPU, memory, disk, network; GPU with
``nvidia-ml-py`` installed) as ``system/*``.

Everything goes through ``MlflowClient`` with an explicit run id — no fluent global "active run" state,
so a library call can never log into somebody else's run by accident. Params are flattened with dotted
keys (``pretrain.lr``); values are truncated to MLflow's limit. Logging errors are reported once and
then ignored: losing a metric must never kill a multi-hour training run.

This is the only module that imports mlflow. The run operations (``create_run``, ``log_run_params``,
``end_run`` ...) take an ``MlflowClient`` and a run id, so the pipeline's run tree
(tasks/tracking_tasks.py) and :class:`Tracker` (one job's run) share one implementation of each.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

PARAM_VALUE_MAX = 6000


def tracking_uri(configured: str = "") -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"file://{Path('mlruns').resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        # MLflow ≥ 3.7 refuses the file store unless opted in; ./mlruns is this project's documented
        # default (and what `mlflow ui --backend-store-uri ./mlruns` reads), so opt in for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _leaves(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf; an empty dict is a leaf (so an empty section still shows)."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _param_text(v: Any) -> str:
    return (v if isinstance(v, str) else json.dumps(v, default=str))[:PARAM_VALUE_MAX]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"}; lists/None become their JSON text."""
    return {key: _param_text(v) for key, v in _leaves(d, prefix)}


def numeric_leaves(d: dict[str, Any]) -> dict[str, float]:
    """The numbers of a nested dict (a manifest's counts) as dotted-key metrics; bools are not numbers here."""
    return {k: float(v) for k, v in _leaves(d) if isinstance(v, (int, float)) and not isinstance(v, bool)}


DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's own input-tag key (mlflow.utils.mlflow_tags)
ROLE_TAG = "kiln.role"
# <root>/<stage>/<key>: a stage output (llm/stages/output.py's layout; keys are 20 hex digits).
_STAGE_DIR = re.compile(r"(?:^|/)([A-Za-z0-9_.\-]+)/[0-9a-f]{20}(?=/|$)")


def input_context(stage: str, role: str) -> str:
    """What ``stage`` does with its input ``role``, in MLflow's ``mlflow.data.context`` words.

    Token shards train a training stage and are what an eval scores; a model input is the starting
    weights of a training stage and the thing an eval scores; raw documents are the source a data
    stage transforms (and the training data of the tokenizer).
    """
    if stage == "report":
        return "report"
    if role == "tokens":
        return "evaluation" if stage == "eval" else "training"
    if role == "model":
        return "evaluated_model" if stage == "eval" else "base_model"
    if role == "docs":
        return "training" if stage == "tokenizer" else "source"
    return role


def upstream_stage(uri: str) -> str | None:
    """The stage whose output ``uri`` is (or lies inside: a checkpoint of a training output)."""
    found = _STAGE_DIR.findall(uri.rstrip("/"))
    return found[-1] if found else None


def read_stage_inputs(uris: dict[str, str | None], endpoint_url: str = "") -> dict[str, dict[str, Any]]:
    """{role: URI} → {role: {"uri", "hash", "stage", "counts"}} from each output's ``manifest.json``.

    For a job that only knows its input URIs (the trainer). Roles without a URI or whose URI is not a
    finished stage output (``tiktoken:gpt2``, a bare checkpoint) are left out: without a manifest
    there is no content hash to name the data by.
    """
    from llm.storage import Store, join

    out: dict[str, dict[str, Any]] = {}
    for role, uri in uris.items():
        if not uri:
            continue
        try:
            m = json.loads(Store(uri, endpoint_url).get_bytes(join(uri, "manifest.json")))
        except Exception:  # noqa: BLE001 - lineage metadata must never stop the job that asks for it
            continue
        if m.get("hash"):
            out[role] = {"uri": uri, "hash": m["hash"], "stage": m.get("stage"), "counts": m.get("counts") or {}}
    return out


def dataset_inputs(stage: str, inputs: dict[str, dict[str, Any]]) -> list[Any]:
    """MLflow ``DatasetInput``s for a stage's inputs ({role: {"uri", "hash", optional "stage", "counts"}}).

    The dataset's profile holds the upstream manifest's counts (docs, tokens ...), which the UI shows
    next to the digest. Two roles reading the same output would be one MLflow dataset, and MLflow keeps
    one input per dataset and run, so those are told apart as ``<stage>/<role>``.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    names = {role: inp.get("stage") or upstream_stage(inp["uri"]) or role for role, inp in inputs.items()}
    seen: dict[tuple[str, str], int] = {}
    for role, inp in inputs.items():
        seen[(names[role], inp["hash"])] = seen.get((names[role], inp["hash"]), 0) + 1
    result = []
    for role in sorted(inputs):
        inp = inputs[role]
        name = names[role]
        if seen[(name, inp["hash"])] > 1 and name != role:
            name = f"{name}/{role}"
        with warnings.catch_warnings():  # a local path "can be read two ways" (both the local source)
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(inp["uri"])
        meta = MetaDataset(source, name=name, digest=str(inp["hash"])).to_dict()
        counts = {k: v for k, v in (inp.get("counts") or {}).items() if v is not None}
        result.append(DatasetInput(
            Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"], source=meta["source"],
                    profile=json.dumps(counts, sort_keys=True, default=str) if counts else None),
            tags=[InputTag(DATASET_CONTEXT_TAG, input_context(stage, role)), InputTag(ROLE_TAG, role)]))
    return result


def log_stage_inputs(client: Any, run_id: str, stage: str, inputs: dict[str, dict[str, Any]]) -> None:
    """Log ``inputs`` (see :func:`dataset_inputs`) to ``run_id``; logging them again is a no-op in MLflow."""
    items = dataset_inputs(stage, inputs)
    if items:
        client.log_inputs(run_id, datasets=items)


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (see :func:`tracking_uri`), for callers that keep a run tree."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """A browsable link to a run: the MLflow UI for a server, the run's directory for a file store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith("file:"):
        return f"{uri.rstrip('/')}/{experiment_id}/{run_id}"
    return f"{uri}#experiments/{experiment_id}/runs/{run_id}"


PARENT_TAG = "mlflow.parentRunId"  # MLflow nests a run under the run this tag names
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # shown by the MLflow UI as the run's source version
ERROR_MAX = 5000  # characters of an error message kept in a run's ``kiln.error`` tag


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing (by us, or by a run racing us to it)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another run created it between the two calls
        return client.get_experiment_by_name(name).experiment_id


@dataclass(frozen=True)
class FoundRun:
    """What a search for an existing run tells its caller, without MLflow's entity types."""

    run_id: str
    status: str
    tags: dict[str, str]


def find_run(client: Any, experiment: str, tags: dict[str, str], parent: str | None = None) -> FoundRun | None:
    """The first run of ``experiment`` (an id) carrying all ``tags`` (and nested under ``parent``), if any."""
    want = tags | ({PARENT_TAG: parent} if parent else {})
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in want.items())
    found = client.search_runs([experiment], query, max_results=1)
    if not found:
        return None
    return FoundRun(found[0].info.run_id, found[0].info.status, dict(found[0].data.tags))


def create_run(client: Any, experiment: str, *, tags: dict[str, str], run_name: str | None = None,
               parent: str | None = None) -> str:
    """A new run in ``experiment`` (an id), nested under ``parent`` when given; returns its id."""
    run_tags = dict(tags) | ({PARENT_TAG: parent} if parent else {})
    return client.create_run(experiment, run_name=run_name, tags=run_tags).info.run_id


def reopen_run(client: Any, run_id: str) -> None:
    """Mark a run of an earlier attempt running again (a resumed job, a retried flow run)."""
    client.update_run(run_id, status="RUNNING")


def end_run(client: Any, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    """Terminate a run; ``error`` (truncated) is kept as its ``kiln.error`` tag."""
    if error:
        client.set_tag(run_id, "kiln.error", error[:ERROR_MAX])
    client.set_terminated(run_id, status=status)


def log_run_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Flat ``params`` (see :func:`flatten`); a value that is not text is logged as its JSON."""
    from mlflow.entities import Param

    items = [Param(k, _param_text(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def log_run_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    for i in range(0, len(items), 500):  # under MLflow's 1000 metrics per batch
        client.log_batch(run_id, metrics=items[i:i + 500])


def set_run_tags(client: Any, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, tags=items[i:i + 100])


def log_run_text(client: Any, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def log_run_artifact(client: Any, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client.log_artifact(run_id, str(path), artifact_path)


def config_tracker(cfg: Any, *, run_name: str, tags: dict[str, str] | None = None,
                   resume_run_id: str | None = None, existing_only: bool = False) -> NullTracker:
    """:func:`start_tracker` with ``cfg.run``'s tracking URI and experiment: how a stage in this process tracks.

    ``existing_only``: when there is neither a run handed down (``KILN_MLFLOW_RUN_ID``) nor a
    ``resume_run_id``, return a NullTracker rather than start a stray run for a few extra numbers.
    """
    if existing_only and not resume_run_id and not os.environ.get("KILN_MLFLOW_RUN_ID"):
        return NullTracker()
    return start_tracker(tracking_uri_=cfg.run.mlflow_tracking_uri, experiment=cfg.run.mlflow_experiment,
                         run_name=run_name, tags=tags, resume_run_id=resume_run_id)


class NullTracker:
    """Same interface, does nothing: used on ranks > 0 and when tracking is disabled."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None, *, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None: ...
    def log_model(self, name: str, *, params: dict[str, Any], tags: dict[str, str] | None = None, step: int = 0,
                  metrics: dict[str, float | None] | None = None, files: tuple[Path, ...] = ()) -> str | None:
        return None
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_inputs(self, stage: str, inputs: dict[str, dict[str, Any]]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """Logs into one MLflow run via MlflowClient."""

    def __init__(self, *, tracking_uri_: str, experiment: str, run_name: str | None = None,
                 tags: dict[str, str] | None = None, resume_run_id: str | None = None, system_metrics: bool = False):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri_)
        self.tracking_uri = tracking_uri_
        self._warned = False
        self._monitor: Any = None
        self.owned = True
        given = os.environ.get("KILN_MLFLOW_RUN_ID")
        parent = os.environ.get("KILN_MLFLOW_PARENT_RUN_ID")
        if given:
            self.run_id, self.owned = given, False
        elif resume_run_id and self._run_exists(resume_run_id):
            self.run_id = resume_run_id
            reopen_run(self.client, resume_run_id)
        else:
            exp_id = ensure_experiment(self.client, experiment)
            if parent:
                # A child lives in its parent's experiment so the MLflow UI shows it nested.
                exp_id = self.client.get_run(parent).info.experiment_id
            self.run_id = create_run(self.client, exp_id, tags=dict(tags or {}), run_name=run_name, parent=parent)
        if tags and not self.owned:
            self.set_tags(tags)
        if system_metrics:
            self._guard("system metrics", self._start_system_metrics)

    def _start_system_metrics(self) -> None:
        """CPU, memory, disk, network (and GPU where pynvml finds one) as ``system/*`` every
        ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (10 by default), until :meth:`end`."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.tracking_uri)
        self._monitor.start()

    def _stop_system_metrics(self) -> None:
        """Stop the sampler, then log one last sample: MLflow's loop drops the one in progress at shutdown,
        so a run shorter than the interval would otherwise have no system metrics at all."""
        m = self._monitor
        m.finish()
        m.collect_metrics()
        m.publish_metrics(m.aggregate_metrics())
        m.mlflow_logger.flush()

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
        flat = flatten(params)
        self._guard("log_params", lambda: log_run_params(self.client, self.run_id, flat))

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None, *, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """``model_id`` files the metrics under that LoggedModel too; ``dataset`` = (name, digest) of the
        data they were measured on (MLflow shows a model's metrics per dataset)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        items = [Metric(k, float(v), ts, step or 0, model_id=model_id, dataset_name=name, dataset_digest=digest)
                 for k, v in metrics.items() if v is not None and v == v]  # drop None and NaN
        if items:
            self._guard("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard("log_text", lambda: log_run_text(self.client, self.run_id, text, artifact_file))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifact", lambda: log_run_artifact(self.client, self.run_id, path, artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard("set_tags", lambda: set_run_tags(self.client, self.run_id, tags))

    def log_inputs(self, stage: str, inputs: dict[str, dict[str, Any]]) -> None:
        """The stage outputs this run reads, as MLflow dataset inputs (see the module docstring)."""
        self._guard("log_inputs", lambda: log_stage_inputs(self.client, self.run_id, stage, inputs))

    def log_model(self, name: str, *, params: dict[str, Any], tags: dict[str, str] | None = None, step: int = 0,
                  metrics: dict[str, float | None] | None = None, files: tuple[Path, ...] = ()) -> str | None:
        """A finalized LoggedModel ``name`` produced by this run at ``step``; returns its model_id.

        ``files`` are copied as the model's artifacts (small ones: the checkpoint's meta.json), ``metrics``
        are logged to the run against the model.
        """
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        made: dict[str, str] = {}

        def go() -> None:
            exp = self.client.get_run(self.run_id).info.experiment_id
            m = self.client.create_logged_model(exp, name=name, source_run_id=self.run_id, tags=dict(tags or {}),
                                                params=flatten(params), model_type=MODEL_TYPE)
            made["id"] = m.model_id
            for f in files:
                self.client.log_model_artifact(m.model_id, str(f))
            self.client.finalize_logged_model(m.model_id, LoggedModelStatus.READY)
            self.client.log_outputs(self.run_id, [LoggedModelOutput(m.model_id, step)])

        self._guard("log_model", go)
        if "id" in made and metrics:
            self.log_metrics(metrics, step, model_id=made["id"])
        return made.get("id")

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._guard("system metrics", self._stop_system_metrics)
            self._monitor = None
        if self.owned:
            self._guard("end", lambda: self.client.set_terminated(self.run_id, status=status))


def start_tracker(*, rank: int = 0, enabled: bool = True, tracking_uri_: str = "", experiment: str = "kiln",
                  run_name: str | None = None, tags: dict[str, str] | None = None,
                  resume_run_id: str | None = None, system_metrics: bool = False) -> NullTracker:
    """The tracker for this process: a real one on rank 0 when enabled, else a NullTracker.

    If MLflow cannot be reached at all, training goes on with a NullTracker and one warning.
    """
    if rank != 0 or not enabled:
        return NullTracker()
    try:
        return Tracker(tracking_uri_=tracking_uri(tracking_uri_), experiment=experiment, run_name=run_name,
                       tags=tags, resume_run_id=resume_run_id, system_metrics=system_metrics)
    except Exception as e:  # noqa: BLE001
        print(f"[tracking] MLflow unavailable ({type(e).__name__}: {e}); not tracking this run",
              file=sys.stderr, flush=True)
        return NullTracker()


# --------------------------------------------------------------------------- MLflow 3 models and registry

MODEL_TYPE = "kiln-gpt"
# The alias the pipeline's newest registered model gets ("latest" is reserved by MLflow).
CURRENT_ALIAS = "current"
TAG_VALUE_MAX = 5000  # MLflow's limit for a model version tag value


def find_logged_model(client: Any, run_id: str | None, name: str | None = None) -> str | None:
    """The newest LoggedModel produced by ``run_id`` (and named ``name``), or None: how an eval or the
    registry finds the model of a training stage from the run id in its manifest."""
    if not run_id:
        return None
    exp = client.get_run(run_id).info.experiment_id
    where = f"source_run_id = '{run_id}'" + (f" AND name = '{name}'" if name else "")
    found = client.search_logged_models([exp], filter_string=where, max_results=1,
                                        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    return found[0].model_id if found else None


def logged_model_of_checkpoint(client: Any, checkpoint_uri: str, endpoint_url: str = "") -> str | None:
    """The LoggedModel of the training stage that wrote this checkpoint (its meta names the run and the
    stage), or None when it was not tracked or its run is in another MLflow store."""
    from llm.checkpoint import read_meta, resolve_checkpoint_dir

    try:
        meta = read_meta(resolve_checkpoint_dir(checkpoint_uri, endpoint_url=endpoint_url))
        return find_logged_model(client, meta.get("mlflow_run_id"), meta.get("stage"))
    except Exception:  # noqa: BLE001 - a missing link is not worth failing an eval or an export for
        return None


def registered_model_name(preset: str) -> str:
    """``kiln-<preset>``, with characters MLflow's UI URLs would trip on replaced."""
    return "kiln-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", preset or "custom").strip("-")


def register_model_version(tracking_uri_: str, name: str, *, source: str, model_id: str | None, run_id: str | None,
                           tags: dict[str, str], identity: tuple[str, str], description: str = "") -> Any:
    """Register a model version (once per ``identity`` = (tag key, value)) and point ``current`` at it.

    The source is ``models:/<model_id>`` when the training run logged the model (MLflow 3's link between a
    version and its LoggedModel, which also gets the ``mlflow.modelVersions`` tag as ``mlflow.register_model``
    gives it), else ``source`` itself. Registering the same export twice finds the first version.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri_)
    try:
        client.create_registered_model(name, tags={"kiln.registered_by": "kiln export"},
                                       description="Kiln pipeline models (the SFT model of each pipeline run).")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    key, value = identity
    found = client.search_model_versions(f"name = '{name}' and tag.`{key}` = '{value}'")
    if found:
        version = found[0]
    else:
        tags = {k: str(v)[:TAG_VALUE_MAX] for k, v in {**tags, key: value}.items()}
        version = _create_version(client, tracking_uri_, name, source, model_id, run_id, tags, description)
    client.set_registered_model_alias(name, CURRENT_ALIAS, version.version)
    return client.get_model_version(name, version.version)


def _create_version(client: Any, tracking_uri_: str, name: str, source: str, model_id: str | None,
                    run_id: str | None, tags: dict[str, str], description: str) -> Any:
    if model_id is None:
        return client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description)
    # MLflow's registry store resolves models:/<id> with a client on the *global* tracking URI (a TODO in
    # its code); make that this client's URI for the call.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri_):
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                              description=description, model_id=model_id)
    links = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
    links.append({"name": name, "version": version.version})
    client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(links)})
    return version
