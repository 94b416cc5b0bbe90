"""The ``data`` flow under a real (temporary) Prefect server: end to end, then a rerun that is all cache hits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import pytest

import prefect  # noqa: F401  (a required dependency: fail, never skip)

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_HOME,
    PREFECT_LOCAL_STORAGE_PATH,
    PREFECT_LOGGING_TO_API_ENABLED,
    temporary_settings,
)
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.data import DATA_STAGES, data_flow  # noqa: E402
from llm.data.shards import open_split, read_meta  # noqa: E402
from llm.stages.output import verify_output  # noqa: E402
from llm.storage import Store  # noqa: E402
from llm.tokenizer import load_tokenizer  # noqa: E402


def _task_states(flow_run_id, expect: Iterable[str] = DATA_STAGES, timeout: float = 120.0) -> dict[str, str]:
    """Task-run name -> final state name, read back from the Prefect API.

    Prefect 3 records task-run states from events the flow's process sends in the background, so the
    API can lag the flow's return. Read until every ``expect``-ed task run is there and every task run
    is in a final state; after ``timeout`` return what is there, for the caller's assertion to show.
    """
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {r.name: r.state for r in runs}
        settled = set(expect) <= set(states) and all(st is not None and st.is_final() for st in states.values())
        if settled or time.monotonic() > deadline:
            return {name: st.name if st is not None else "None" for name, st in states.items()}
        time.sleep(0.2)


@pytest.fixture()
def prefect_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A throwaway Prefect home, result storage and server, all under tmp_path."""
    home, results = tmp_path / "prefect-home", tmp_path / "prefect-results"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(results))
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(results))
    with temporary_settings(updates={PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: results,
                                     PREFECT_LOGGING_TO_API_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield results


def test_data_flow_runs_then_reruns_from_cache(prefect_env: Path, tmp_path: Path, shared_data: Path) -> None:
    root = tmp_path / "artifacts"
    overrides = {
        "run.artifact_root": str(root),
        "orchestration.result_storage": str(prefect_env),  # cache records in tmp, not ./.kiln
        "download.max_rows": 300,
        "tokenizer.vocab_size": 512,
        "tokenizer.max_train_chars": 2_000_000,
        "tokenize.val_fraction": 0.05,
    }
    first = data_flow(preset="tiny", overrides=overrides, return_state=True)
    assert first.is_completed(), first
    uris = first.result()
    assert list(uris) == DATA_STAGES
    store = Store(str(root))
    manifests = {name: verify_output(store, uri) for name, uri in uris.items()}
    assert all(m is not None for m in manifests.values()), manifests
    assert all(s != "Cached" for s in _task_states(first.state_details.flow_run_id).values())

    # The chain is wired: each stage's manifest names its upstream's output.
    assert manifests["tokenize"]["inputs"]["docs"]["uri"] == uris["dedup"]
    assert manifests["tokenize"]["inputs"]["tokenizer"]["uri"] == uris["tokenizer"]
    assert manifests["tokenizer"]["counts"]["vocab_size"] == 512
    tok = load_tokenizer(uris["tokenizer"])
    meta = read_meta(uris["tokenize"])
    assert meta["dtype"] == "uint16" and meta["bos_id"] == tok.bos_id
    train = open_split(uris["tokenize"], "train")
    assert sum(len(s) for s in train) == manifests["tokenize"]["counts"]["train_tokens"] > 0
    assert manifests["tokenize"]["counts"]["docs"] <= manifests["dedup"]["counts"]["docs_out"]

    second = data_flow(preset="tiny", overrides=overrides, return_state=True)
    assert second.is_completed(), second
    assert second.result() == uris
    states = _task_states(second.state_details.flow_run_id)
    assert sorted(states) == sorted(DATA_STAGES)
    assert set(states.values()) == {"Cached"}, states
    assert len(list(prefect_env.iterdir())) >= len(DATA_STAGES)  # the cache records are where we said

    # force recomputes exactly the named stage; a stage downstream of identical bytes stays Cached.
    filter_mtime = (Path(uris["filter"]) / "manifest.json").stat().st_mtime_ns
    third = data_flow(preset="tiny", overrides=overrides, force=["filter"], return_state=True)
    assert third.is_completed(), third
    assert third.result() == uris  # deterministic stage: same key, same bytes
    states = _task_states(third.state_details.flow_run_id)
    assert states["filter"] != "Cached", states
    assert {s for name, s in states.items() if name != "filter"} == {"Cached"}, states
    assert (Path(uris["filter"]) / "manifest.json").stat().st_mtime_ns > filter_mtime  # really recomputed
