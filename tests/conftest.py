"""Shared fixtures: where the offline data kit is, and an isolated artifact root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("KILN_DATA_MIRROR")
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    assert (d / "pretrain").is_dir(), f"offline data kit not found at {d} (set KILN_DATA_MIRROR)"
    return d


@pytest.fixture()
def artifact_root(tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    return root


@pytest.fixture(autouse=True)
def _isolate_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's caches, MLflow store and Prefect home inside its tmp dir."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "kiln-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    # MLflow >= 3.7 refuses file stores unless opted in; a throwaway per-test store is what we want here.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("KILN_DATA_MIRROR", str(shared_data_dir()))
