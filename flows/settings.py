"""How a flow turns its parameters into a KilnConfig, with site-wide defaults from the worker.

A worker can carry settings that every flow run on it should use (where artifacts live, the
shared result storage, the MLflow server) without every ``prefect deployment run`` repeating
them: ``KILN_OVERRIDES`` is a JSON object of dotted overrides, applied under the run's own
``overrides`` (so a run can still change anything). docker/docker-compose.yml sets it to put
artifacts and Prefect results on the S3 server.

    KILN_OVERRIDES='{"run.artifact_root": "s3://kiln/artifacts", "orchestration.result_storage": "s3://kiln/prefect-results"}'
"""

from __future__ import annotations

import json
import os
from typing import Any

from llm.config import ConfigError, KilnConfig, load_config, parse_overrides


def site_overrides() -> dict[str, Any]:
    raw = os.environ.get("KILN_OVERRIDES", "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"KILN_OVERRIDES is not valid JSON ({e}): {raw[:200]!r}") from None
    if not isinstance(data, dict):
        raise ConfigError("KILN_OVERRIDES must be a JSON object of dotted keys, e.g. {\"run.artifact_root\": \"s3://b/p\"}")
    return data


def flow_config(preset: str, overrides: dict[str, Any] | list[str] | None) -> KilnConfig:
    """``preset`` + ``KILN_OVERRIDES`` + the run's ``overrides`` (a dict or ``["k=v", ...]``)."""
    merged: dict[str, Any] = dict(site_overrides())
    if isinstance(overrides, dict):
        merged.update(overrides)
    elif overrides:
        merged.update(parse_overrides(overrides))
    return load_config(preset, merged)
