"""Shared fixtures: where the offline data kit is, and an isolated artifact root."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def _isolate_session_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A baseline for what runs before the per-test fixture below: module- and session-scoped
    fixtures are set up first, so without this they would see the developer's own caches and
    MLflow store (and could write to them)."""
    base = tmp_path_factory.mktemp("session-env")
    saved = {k: os.environ.get(k) for k in ("KILN_CACHE", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "HF_HOME")}
    os.environ.update({"KILN_CACHE": str(base / "kiln-cache"), "MLFLOW_TRACKING_URI": f"file://{base / 'mlruns'}",
                       "MLFLOW_ALLOW_FILE_STORE": "true", "HF_HOME": str(base / "hf-home")})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


@pytest.fixture()
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One intra-op thread here and in spawned jobs: the CI box has 2 shared cores, and OpenMP
    spin-waiting across busy cores makes 2 threads ~50x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
