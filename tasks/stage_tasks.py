"""Prefect tasks for every stage: thin wrappers over ``llm.stages.registry.execute``.

Caching follows the stage's content key (``llm.stages.registry.stage_key``: config sections +
upstream manifest hashes + the stage's explicit code version, the same key the stage publishes
under) and the artifact root, never ``RUN_ID`` or
``TASK_SOURCE``: a new flow run with the same config finds every stage ``Cached``, and
changing only the SFT config changes only the keys from SFT on. Cache records live in
``cfg.orchestration.result_storage`` (see :mod:`tasks.results`), shared by all workers.

Two ways to run a stage, with the same cache key so either finds the other's work:
- :func:`stage_task` runs it in this process;
- :func:`stage_deployment_task` runs it as the ``<stage>/<deployment>`` deployment (the
  gpu pool) through ``run_deployment`` and fails with the child's error when it fails.

A Prefect cache record can outlive the artifacts it points to (someone cleaned the store).
:func:`run_stage_task` checks the output first and refreshes the cache when it is gone, so
a stale record never hands a missing URI downstream.

Retries: only transient failures (network, S3 5xx/throttling, a crashed child flow run =
a lost worker) are retried, with backoff. A :class:`~llm.stages.output.StageError`, a config error,
or any error we cannot show to be transient fails at once with the real message.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from prefect import get_run_logger, task
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import PrefectFuture
from prefect.states import State

from llm.config import ConfigError, KilnConfig
from llm.stages.output import StageError, require_manifest, verify_output
from llm.stages.registry import STAGES, execute, stage_key
from llm.storage import Store, is_transient as is_transient_storage_error, join
from tasks.results import RESULT_SERIALIZER, result_storage_for

# --------------------------------------------------------------------------- errors / retries


class ChildRunFailed(StageError):
    """A stage deployment's flow run failed; the message carries the child's own error."""


class ChildRunLost(RuntimeError):
    """A stage deployment's flow run crashed (worker lost, OOM-killed, infrastructure): retryable."""


class ChildRunTimeout(RuntimeError):
    """We stopped waiting for a stage deployment (orchestration.deployment_timeout_s)."""


_NETWORK_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                   errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}


def is_transient(exc: BaseException) -> bool:
    """True when running the same thing again can succeed (see module docstring).

    Walks the ``__cause__``/``__context__`` chain so a wrapper (``RuntimeError(...) from
    ConnectionResetError``) is classified by its cause, but an explicit deterministic error
    anywhere on top wins.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (StageError, ConfigError, ChildRunTimeout)):
            return False
        if isinstance(e, ChildRunLost) or getattr(e, "transient", False) or is_transient_storage_error(e):
            return True
        if _lost_training_job(e):
            return True
        if isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS:
            return True
        name = type(e).__module__ + "." + type(e).__name__
        if name.startswith(("httpx.", "httpcore.")) and any(k in name for k in ("Connect", "Timeout", "Network", "Protocol")):
            return True
        if name.startswith(("requests.", "urllib3.")) and any(k in name for k in ("Connection", "Timeout", "ChunkedEncoding")):
            return True
        e = e.__cause__ or e.__context__
    return False


# Lines in a failed torchrun job's tail that mean the job, not the code, broke.
_INFRA_MARKERS = ("NCCL", "ProcessGroupNCCL", "Connection reset", "Broken pipe", "rendezvous", "ECC error",
                  "Socket Timeout", "DistNetworkError")


def _lost_training_job(e: BaseException) -> bool:
    """A torchrun job killed by a signal (preempted, lost node) or broken by the network between ranks.

    Training resumes from its newest checkpoint (llm/train/stages.py), so a retry costs only
    the steps since then. An ordinary non-zero exit (a bug, bad data, CUDA OOM) is not retried.
    """
    if type(e).__name__ == "TrainingFailed":
        code = getattr(e, "code", 0)
        tail = "\n".join(getattr(e, "tail", []) or [])
        return code < 0 or code in (137, 143) or any(m in tail for m in _INFRA_MARKERS)
    # llm.train.stages raises this when the job checkpointed and stopped on a signal.
    return isinstance(e, RuntimeError) and "run again to resume" in str(e)


def retry_on_transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    """Prefect retry condition: retry only what :func:`is_transient` accepts."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classified
        return is_transient(exc)
    return False


# --------------------------------------------------------------------------- cache keys


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:  # noqa: ARG001
    from llm.torchrun import is_follower

    if STAGES[parameters["stage"]].multinode and is_follower():
        return None  # a multi-node follower's result names no output of its own: never a cache record
    cfg = KilnConfig.model_validate(parameters["config"])
    key, _ = stage_key(parameters["stage"], cfg, parameters["inputs"])
    # The root is part of the key (two roots hold two copies), hashed to keep the record name short.
    root = hashlib.sha256(cfg.run.artifact_root.encode()).hexdigest()[:12]
    return f"kiln-{parameters['stage']}-{key}-{root}"


# --------------------------------------------------------------------------- fault drill


def _fault_marker(cfg: KilnConfig, stage: str, key: str) -> str:
    return join(cfg.run.artifact_root, "_faults", f"{stage}-{key}")


def maybe_inject_failure(cfg: KilnConfig, stage: str, key: str) -> None:
    """``orchestration.fail_once``: fail the first computation of this (stage, key), once.

    Documented in docs/orchestration.md; used by the retry test and for fire drills. The
    marker is written before raising, so a retried flow run computes the stage normally.
    """
    if stage not in cfg.orchestration.fail_once:
        return
    store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    marker = _fault_marker(cfg, stage, key)
    if store.exists(marker):
        return
    store.put_bytes(f"{time.time()}\n".encode(), marker)
    raise StageError(f"{stage}: injected failure (orchestration.fail_once={cfg.orchestration.fail_once}); "
                     f"marker {marker} written, a retry will run the stage")


# --------------------------------------------------------------------------- in-process stage

_ENV_LOCK = threading.Lock()


@contextmanager
def stage_environment(mlflow_run_id: str | None, tracking_uri: str | None) -> Iterator[None]:
    """Expose the stage's MLflow run to everything it launches (torchrun inherits os.environ).

    llm/tracking.py logs into ``KILN_MLFLOW_RUN_ID`` when set. The lock keeps two stages in
    one process from seeing each other's run ids.
    """
    values = {"KILN_MLFLOW_RUN_ID": mlflow_run_id, "MLFLOW_TRACKING_URI": tracking_uri}
    with _ENV_LOCK:
        old = {k: os.environ.get(k) for k in values}
        for k, v in values.items():
            if v:
                os.environ[k] = v
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _current_flow_run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def _summary(stage: str, manifest: dict[str, Any], *, reused: bool, mlflow_run_id: str | None) -> dict[str, Any]:
    return {
        "stage": stage,
        "uri": manifest["uri"],
        "key": manifest["key"],
        # None on a multi-node follower, which publishes nothing ("follower" says what it did instead).
        "hash": manifest.get("hash"),
        "follower": manifest.get("follower", ""),
        "counts": manifest.get("counts", {}),
        "seconds": manifest.get("timings", {}).get("seconds"),
        # False when this call computed the output; True when a verified output was reused.
        "reused": reused,
        # Who produced this result: a Prefect cache hit hands back these same values,
        # which is how a later run says "reused from run X".
        "mlflow_run_id": mlflow_run_id,
        "flow_run_id": _current_flow_run_id(),
    }


# Both stage tasks (in-process and as a deployment) cache on the content key and retry only transient failures.
# Their results (the summary above: strings, numbers, counts) are stored as JSON, never pickled: see tasks.results.
STAGE_TASK_OPTIONS: dict[str, Any] = dict(
    cache_key_fn=_cache_key,
    persist_result=True,
    result_serializer=RESULT_SERIALIZER,
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_jitter_factor=0.2,
    retry_condition_fn=retry_on_transient,
    task_run_name="{stage}",
)


@task(name="stage", **STAGE_TASK_OPTIONS)
def stage_task(
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    force: bool = False,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Run one stage in this process; returns a summary (URI, key, counts). Never tensors."""
    cfg = KilnConfig.model_validate(config)
    logger = get_run_logger()
    key, uri = stage_key(stage, cfg, inputs)
    store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    if force or verify_output(store, uri) is None:
        maybe_inject_failure(cfg, stage, key)
    from tasks.tracking_tasks import tracking_uri  # local: keeps the module import light

    from llm.torchrun import line_sink

    # torchrun's output lines (plan, steps, evals, failures) go into this task's Prefect log.
    with stage_environment(mlflow_run_id, tracking_uri(cfg)), line_sink(logger.info):
        res = execute(stage, cfg, inputs, force=force, progress=False)
    if res.follower:
        logger.info("%s", res.follower)
    else:
        logger.info("%s %s -> %s", stage, "reused" if res.cached else "computed", res.uri)
    return _summary(stage, res.manifest, reused=res.cached, mlflow_run_id=mlflow_run_id)


# --------------------------------------------------------------------------- stage as a deployment


def deployment_name(stage: str, cfg: KilnConfig) -> str:
    return f"{stage}/{cfg.orchestration.deployment or cfg.preset}"


def raise_for_child(flow_run: Any, name: str, stage: str) -> None:
    """Turn a finished (or abandoned) child flow run into the right exception.

    ``run_deployment`` returns the child's flow run whatever its state; a parent that
    ignored it would carry on with a missing output.
    """
    state = flow_run.state
    if state is not None and state.is_completed():
        return
    where = f"deployment {name} (flow run {flow_run.name!r}, id {flow_run.id})"
    if state is None or not state.is_final():
        raise ChildRunTimeout(f"{stage}: gave up waiting for {where}; it is {state.name if state else 'unknown'}")
    msg = f"{stage} failed in {where}, state {state.name}: {state.message or 'no message'}"
    if state.is_crashed():
        raise ChildRunLost(msg)
    raise ChildRunFailed(msg)


@task(name="stage-deployment", **STAGE_TASK_OPTIONS)
def stage_deployment_task(
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    force: bool = False,
    mlflow_run_id: str | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Run one stage as its deployment (a flow run on the gpu pool) and wait for it.

    The child recomputes nothing that is done (its own stage task is cached on the same
    key and the stage verifies its manifest), so retrying this wrapper never retrains a
    finished stage. The output is found by content key, not by reading the child's result.
    """
    from prefect.deployments import run_deployment

    cfg = KilnConfig.model_validate(config)
    logger = get_run_logger()
    name = deployment_name(stage, cfg)
    params = {"config": config, "inputs": inputs, "force": force, "mlflow_run_id": mlflow_run_id}
    if STAGES[stage].per_model and label and label.startswith(f"{stage}_"):
        params["model_stage"] = label[len(stage) + 1:]  # names the child's task <stage>_<model stage>
    flow_run = run_deployment(
        name,
        parameters=params,
        timeout=cfg.orchestration.deployment_timeout_s,
        poll_interval=cfg.orchestration.poll_interval_s,
        job_variables=cfg.orchestration.gpu_job_variables or None,
        tags=["kiln", f"stage:{stage}"] + ([f"label:{label}"] if label else []),
        flow_run_name=f"{label or stage}-{cfg.preset}",
    )
    pool = getattr(flow_run, "work_pool_name", None)
    if pool and pool != cfg.orchestration.gpu_pool:
        logger.warning("%s ran on work pool %r, not orchestration.gpu_pool=%r: check deployments/prefect.yaml",
                       name, pool, cfg.orchestration.gpu_pool)
    raise_for_child(flow_run, name, stage)
    _, uri = stage_key(stage, cfg, inputs)
    manifest = require_manifest(Store(cfg.run.artifact_root, cfg.run.s3_endpoint), uri, f"{stage} output of {name}")
    logger.info("%s finished in deployment %s (flow run %s) -> %s", stage, name, flow_run.id, uri)
    # "reused" is decided by when the manifest was written: before this call = reused.
    return _summary(stage, manifest, reused=manifest.get("timings", {}).get("started", 0) < _task_started(),
                    mlflow_run_id=mlflow_run_id)


def _task_started() -> float:
    ctx = TaskRunContext.get()
    start = ctx.task_run.start_time if ctx and ctx.task_run else None
    return start.timestamp() if start else time.time()


# --------------------------------------------------------------------------- calling them from a flow


def _prepared(stage: str, cfg: KilnConfig, inputs: dict[str, str], *, force: bool, label: str | None,
              via_deployment: bool):
    """The task with the right options: cache refresh when forced or when the output is gone."""
    store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    _, uri = stage_key(stage, cfg, inputs)
    refresh = force or verify_output(store, uri) is None
    base = stage_deployment_task if via_deployment else stage_task
    return base.with_options(refresh_cache=refresh, task_run_name=label or stage,
                             result_storage=result_storage_for(cfg))


def run_stage_task(stage: str, cfg: KilnConfig, inputs: dict[str, str], *, force: bool = False,
                   label: str | None = None, mlflow_run_id: str | None = None,
                   via_deployment: bool = False) -> tuple[dict[str, Any], bool]:
    """Run a stage now and wait: (summary, prefect_cached). Raises the stage's error on failure."""
    t = _prepared(stage, cfg, inputs, force=force, label=label, via_deployment=via_deployment)
    kwargs: dict[str, Any] = {"force": force, "mlflow_run_id": mlflow_run_id}
    if via_deployment:
        kwargs["label"] = label
    state: State = t(stage, cfg.model_dump(mode="json"), inputs, return_state=True, **kwargs)
    return state.result(), state.name == "Cached"


def submit_stage_task(stage: str, cfg: KilnConfig, inputs: dict[str, str], *, force: bool = False,
                      label: str | None = None, mlflow_run_id: str | None = None,
                      via_deployment: bool = False) -> PrefectFuture:
    """Like :func:`run_stage_task` but returns a future (stages that may run side by side)."""
    t = _prepared(stage, cfg, inputs, force=force, label=label, via_deployment=via_deployment)
    kwargs: dict[str, Any] = {"force": force, "mlflow_run_id": mlflow_run_id}
    if via_deployment:
        kwargs["label"] = label
    return t.submit(stage, cfg.model_dump(mode="json"), inputs, **kwargs)


def resolve_future(future: PrefectFuture) -> tuple[dict[str, Any], bool]:
    future.wait()
    state = future.state
    return state.result(), state.name == "Cached"
