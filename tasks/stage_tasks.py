"""Prefect tasks for every stage: thin wrappers over ``llm.stages.execute``.

Caching follows the stage's content key (config sections + upstream manifest hashes +
the stage's explicit code version + the artifact root), never ``RUN_ID`` or
``TASK_SOURCE``: a new flow run with the same config finds every stage ``Cached``, and
changing only the SFT config changes only the keys from SFT on.

A Prefect cache record can outlive the artifacts it points to (someone cleaned the store).
:func:`run_stage_task` checks the output first and refreshes the cache when it is gone, so
a stale record never hands a missing URI downstream.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from llm.config import KilnConfig
from llm.stage import StageError, content_key, require_manifest, verify_output
from llm.stages import STAGES, execute
from llm.storage import Store


def stage_key(stage: str, cfg: KilnConfig, inputs: dict[str, str]) -> tuple[str, str]:
    """(content key, output URI) of a stage for this config and these inputs."""
    sd = STAGES[stage]
    store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    hashes = {role: require_manifest(store, uri, f"{stage} input {role!r}")["hash"] for role, uri in inputs.items()}
    key = content_key(stage, sd.key_config(cfg), hashes, sd.version)
    return key, store.uri(stage, key)


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    cfg = KilnConfig.model_validate(parameters["config"])
    key, uri = stage_key(parameters["stage"], cfg, parameters["inputs"])
    return f"kiln-{parameters['stage']}-{key}-{cfg.run.artifact_root}"


def _retry_on_transient(task, task_run, state) -> bool:
    """Retry only what can succeed the second time: StageError means bad config or data."""
    try:
        state.result()
    except StageError:
        return False
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


@task(
    name="stage",
    cache_key_fn=_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_on_transient,
    task_run_name="{stage}",
)
def stage_task(stage: str, config: dict[str, Any], inputs: dict[str, str], force: bool = False) -> dict[str, Any]:
    """Run one stage; returns {uri, cached, manifest-summary}. Never returns tensors."""
    cfg = KilnConfig.model_validate(config)
    logger = get_run_logger()
    res = execute(stage, cfg, inputs, force=force, progress=False)
    logger.info("%s %s -> %s", stage, "reused" if res.cached else "computed", res.uri)
    return {"uri": res.uri, "stage": stage, "key": res.manifest["key"], "counts": res.manifest.get("counts", {})}


def run_stage_task(stage: str, cfg: KilnConfig, inputs: dict[str, str], *, force: bool = False, label: str | None = None):
    """Call :func:`stage_task`, refreshing its cache when forced or when the output is gone."""
    store = Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    _, uri = stage_key(stage, cfg, inputs)
    refresh = force or verify_output(store, uri) is None
    t = stage_task.with_options(refresh_cache=refresh, task_run_name=label or stage)
    return t(stage, cfg.model_dump(mode="json"), inputs, force=force)
