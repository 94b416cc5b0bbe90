"""Fast checks of the orchestration layer (no Prefect server): retry classification, child-run
errors, rendezvous arguments, generated deployments, site overrides, the stack's process
handling, S3 result storage against a loopback S3 server, MLflow lineage, docker compose."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- retries


def _client_error(status: int, code: str = "X"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_transient_failures_are_retried_and_deterministic_ones_are_not():
    from llm.config import ConfigError
    from llm.stages.output import StageError
    from llm.train.stages import TrainingFailed
    from tasks.stage_tasks import ChildRunFailed, ChildRunLost, ChildRunTimeout, is_transient

    def wrapped(cause: BaseException) -> RuntimeError:
        try:
            raise RuntimeError("while fetching shard 3") from cause
        except RuntimeError as e:
            return e

    transient = [ConnectionResetError(), TimeoutError(), _client_error(503, "ServiceUnavailable"),
                 _client_error(400, "SlowDown"), wrapped(ConnectionError("reset by peer")), ChildRunLost("crashed"),
                 TrainingFailed("pretrain", -9, ["killed"]), TrainingFailed("pretrain", 1, ["NCCL error: unhandled system error"]),
                 RuntimeError("pretrain: training stopped at step 5 of 10 (interrupted); ... run again to resume")]
    deterministic = [StageError("data/x.parquet row 3: text is null"), ConfigError("unknown key"), ValueError("bad"),
                     KeyError("k"), _client_error(403, "AccessDenied"), _client_error(404, "NoSuchKey"),
                     ChildRunFailed("sft failed: StageError"), ChildRunTimeout("gave up"), RuntimeError("bug"),
                     TrainingFailed("pretrain", 1, ["ValueError: shapes do not match"]),
                     wrapped(StageError("explicit"))]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in deterministic] == [False] * len(deterministic)


def test_retry_condition_reads_the_failed_states_exception():
    from prefect.states import Failed

    from llm.stages.output import StageError
    from tasks.stage_tasks import retry_on_transient

    assert retry_on_transient(None, None, Failed(data=ConnectionResetError("peer"))) is True
    assert retry_on_transient(None, None, Failed(data=StageError("bad row"))) is False


def test_a_child_flow_run_failure_becomes_the_parents_error():
    from prefect.states import Completed, Crashed, Failed, Running

    from tasks.stage_tasks import ChildRunFailed, ChildRunLost, ChildRunTimeout, raise_for_child

    def fr(state):
        return SimpleNamespace(state=state, name="brave-otter", id="1234")

    raise_for_child(fr(Completed()), "sft/tiny", "sft")
    with pytest.raises(ChildRunFailed, match="StageError: bad row 7") as e:
        raise_for_child(fr(Failed(message="Flow run encountered an exception: StageError: bad row 7")), "sft/tiny", "sft")
    assert "sft/tiny" in str(e.value) and "brave-otter" in str(e.value)
    with pytest.raises(ChildRunLost):
        raise_for_child(fr(Crashed(message="worker lost")), "sft/tiny", "sft")
    with pytest.raises(ChildRunTimeout):
        raise_for_child(fr(Running()), "sft/tiny", "sft")


# --------------------------------------------------------------------------- multi-node launch


def test_rendezvous_args():
    from llm.torchrun import rendezvous_args
    from llm.stages.output import StageError

    assert rendezvous_args({}) == ["--standalone"]
    assert rendezvous_args({"KILN_NNODES": "1"}) == ["--standalone"]
    assert rendezvous_args({"KILN_NNODES": "2", "KILN_RDZV_ENDPOINT": "10.0.0.1:29500", "KILN_NODE_RANK": "1",
                            "KILN_RDZV_ID": "d20"}) == [
        "--nnodes=2", "--rdzv-backend=static", "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=d20", "--node-rank=1"]
    with pytest.raises(StageError, match="KILN_RDZV_ENDPOINT"):
        rendezvous_args({"KILN_NNODES": "2"})
    with pytest.raises(StageError, match="host:port"):
        rendezvous_args({"KILN_NNODES": "2", "KILN_RDZV_ENDPOINT": "10.0.0.1"})
    # Which node publishes must be fixed before training: a node rank on every node, static rendezvous.
    two = {"KILN_NNODES": "2", "KILN_RDZV_ENDPOINT": "10.0.0.1:29500"}
    for bad, match in (({}, "KILN_NODE_RANK"), ({"KILN_NODE_RANK": "2"}, "KILN_NODE_RANK=0..1"),
                       ({"KILN_NODE_RANK": "0", "KILN_RDZV_BACKEND": "c10d"}, "join order"),
                       ({"KILN_NNODES": "1:4", "KILN_NODE_RANK": "0"}, "fixed number of nodes")):
        with pytest.raises(StageError, match=match):
            rendezvous_args({**two, **bad})


# --------------------------------------------------------------------------- deployments / config


def test_prefect_yaml_is_generated_from_the_registry_and_current():
    import yaml

    sys.path.insert(0, str(REPO / "deployments"))
    try:
        from render_prefect_yaml import render
    finally:
        sys.path.pop(0)
    from llm.config import list_presets
    from llm.stages.registry import STAGES

    text = (REPO / "deployments" / "prefect.yaml").read_text()
    assert text == render(), "deployments/prefect.yaml is stale: run .venv/bin/python deployments/render_prefect_yaml.py"
    deps = yaml.safe_load(text)["deployments"]
    by = {(d["entrypoint"].split(":")[1], d["name"]): d for d in deps}
    for preset in list_presets():
        assert by[("full_pipeline", preset)]["work_pool"]["name"] == "cpu"
        for name, sd in STAGES.items():
            d = by[(f"{name}_flow", preset)]
            assert d["work_pool"]["name"] == ("gpu" if sd.gpu else "cpu")
            assert d["parameters"] == {"preset": preset}
    from flows import stage_flows

    for (fn, _), d in by.items():  # every entrypoint resolves to a flow named after its stage
        obj = getattr(stage_flows, fn, None) if d["entrypoint"].startswith("flows/stage_flows.py") else None
        if obj is not None:
            assert obj.name == fn.removesuffix("_flow")


def test_prefect_yaml_renders_with_other_pool_names(tmp_path):
    import yaml

    sys.path.insert(0, str(REPO / "deployments"))
    try:
        from render_prefect_yaml import main as render_main
    finally:
        sys.path.pop(0)
    from llm.stages.registry import STAGES

    out = tmp_path / "prefect.yaml"
    assert render_main(["--cpu-pool", "etl", "--gpu-pool", "a100s", "--out", str(out)]) == 0
    text = out.read_text()
    assert "set orchestration.cpu_pool/gpu_pool to match" in text
    pools = {d["entrypoint"].split(":")[1]: d["work_pool"]["name"] for d in yaml.safe_load(text)["deployments"]}
    assert pools["full_pipeline"] == "etl"
    assert {pools[f"{n}_flow"] for n, sd in STAGES.items() if sd.gpu} == {"a100s"}
    assert {pools[f"{n}_flow"] for n, sd in STAGES.items() if not sd.gpu} == {"etl"}
    with pytest.raises(SystemExit):
        render_main(["--gpu-pool", "two words", "--out", str(out)])


def test_site_overrides_apply_under_the_runs_own(monkeypatch):
    from flows.settings import flow_config
    from llm.config import ConfigError

    monkeypatch.setenv("KILN_OVERRIDES", json.dumps({"run.artifact_root": "s3://b/a", "pretrain.steps": 7}))
    cfg = flow_config("tiny", {"pretrain.steps": 9})
    assert cfg.run.artifact_root == "s3://b/a" and cfg.pretrain.steps == 9
    assert flow_config("tiny", ["pretrain.steps=11"]).pretrain.steps == 11
    monkeypatch.setenv("KILN_OVERRIDES", "{not json")
    with pytest.raises(ConfigError, match="KILN_OVERRIDES"):
        flow_config("tiny", None)


def test_fail_once_fails_a_stage_exactly_once(artifact_root):
    from llm.config import load_config
    from llm.stages.output import StageError
    from tasks.stage_tasks import maybe_inject_failure

    cfg = load_config("tiny", {"run.artifact_root": str(artifact_root), "orchestration.fail_once": ["sft"]})
    maybe_inject_failure(cfg, "pretrain", "k1")  # not named: nothing happens
    with pytest.raises(StageError, match="injected failure"):
        maybe_inject_failure(cfg, "sft", "k1")
    maybe_inject_failure(cfg, "sft", "k1")  # second time: runs
    with pytest.raises(StageError):
        maybe_inject_failure(cfg, "sft", "k2")  # another output of the stage fails once too
    with pytest.raises(Exception, match="fail_once names unknown stages"):
        load_config("tiny", {"orchestration.fail_once": ["sfft"]})


# --------------------------------------------------------------------------- result storage on S3


@pytest.fixture()
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="kiln")
    yield endpoint
    server.stop()


def test_s3_result_storage_round_trip(s3_server):
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    from tasks.results import RESULT_SERIALIZER, KilnS3ResultStorage

    block = KilnS3ResultStorage(basepath="s3://kiln/prefect-results", endpoint_url=s3_server)
    # A record as a stage task writes it (JSON); others are refused on read (tests/test_hostile_config.py).
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=RESULT_SERIALIZER, storage_key="kiln-sft-abc"),
                          result={"uri": "s3://kiln/sft/abc"}).serialize()
    block.write_path("kiln-sft-abc", record, _sync=True)
    assert block.read_path("kiln-sft-abc", _sync=True) == record
    with pytest.raises(FileNotFoundError):
        block.read_path("missing", _sync=True)


def test_local_result_storage_is_an_absolute_shared_path(tmp_path, monkeypatch):
    from llm.config import load_config
    from tasks.results import result_storage_for

    monkeypatch.chdir(tmp_path)
    where = result_storage_for(load_config("tiny", {"orchestration.result_storage": "./shared-results"}))
    assert where == tmp_path / "shared-results" and where.is_dir()


# --------------------------------------------------------------------------- MLflow lineage


def test_cached_stage_child_run_names_the_run_that_computed_it(artifact_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from llm.config import load_config
    from tasks.tracking_tasks import PipelineTracker

    cfg = load_config("tiny", {"run.artifact_root": str(artifact_root),
                               "run.mlflow_tracking_uri": f"file://{tmp_path / 'ml'}"})
    summary = {"stage": "filter", "uri": str(artifact_root / "filter" / "k1"), "key": "k1", "hash": "h1",
               "counts": {"docs_in": 10, "docs_out": 7, "removed_by": {"c4": 3}}, "seconds": 1.5, "reused": False,
               "mlflow_run_id": None, "flow_run_id": None}
    first = PipelineTracker.start(cfg, params={"preset": "tiny"})
    child1 = first.stage_start("filter", "filter")
    first.stage_done("filter", "filter", summary, prefect_cached=False)
    first.finish(ok=True)
    second = PipelineTracker.start(cfg, params={"preset": "tiny"})
    child2 = second.stage_start("filter", "filter")
    second.stage_done("filter", "filter", {**summary, "reused": True}, prefect_cached=False)
    c = MlflowClient(tracking_uri=cfg.run.mlflow_tracking_uri)
    r1, r2 = c.get_run(child1), c.get_run(child2)
    assert r1.data.tags["mlflow.parentRunId"] == first.run_id and r1.data.tags["kiln.cached"] == "false"
    assert r1.data.metrics == {"docs_in": 10, "docs_out": 7, "removed_by.c4": 3, "stage_seconds": 1.5}
    assert r1.data.params["cfg.filter.workers"] == "2"
    assert r2.data.tags["kiln.cached"] == "true" and r2.data.tags["kiln.reused_from_run_id"] == child1
    assert r2.data.tags["kiln.cache_level"] == "manifest"


# --------------------------------------------------------------------------- the stack's processes


def test_stack_starts_and_stops_only_its_own_process_group(tmp_path):
    from deployments import stack as st

    s = st.Stack(home=tmp_path, ports={"prefect": 1, "mlflow": 2})
    (tmp_path / "logs").mkdir()
    (tmp_path / "pids").mkdir()
    script = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"
    pid = st.spawn(s, "prefect", [sys.executable, "-c", script], {}, "time.sleep(60)")
    time.sleep(0.5)
    assert st._alive(pid) and st._ours(s, "prefect", pid)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert st.stop(s, "prefect") == "stopped"
        assert not st._alive(pid) and not s.pid_file("prefect").exists()
        assert bystander.poll() is None  # not in the service's group: untouched
        # A PID file pointing at someone else's process (recycled PID) is never killed.
        s.pid_file("mlflow").write_text(f"{bystander.pid} mlflow server\n")
        assert st.stop(s, "mlflow") == "was not running" and bystander.poll() is None
    finally:
        bystander.kill()


def test_stack_status_without_a_stack(tmp_path, capsys):
    from llm.cli.main import main

    assert main(["stack", "status", "--home", str(tmp_path / "none")]) == 1
    assert "kiln stack up" in capsys.readouterr().out


def test_stack_up_refuses_a_busy_port_before_starting_anything(tmp_path, capsys):
    import socket

    from llm.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["stack", "up", "--home", str(tmp_path / "s"), "--prefect-port", str(port), "--mlflow-port", "0"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is already in use" in err and "--prefect-port" in err
    assert not list((tmp_path / "s" / "pids").glob("*.pid"))  # nothing was spawned


# --------------------------------------------------------------------------- docker


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose() is None, reason="no docker compose client")
def test_docker_compose_config_is_valid_and_has_no_default_secrets(tmp_path):
    compose = _compose()
    example = (REPO / "docker" / ".env.example").read_text()
    for secret in ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert f"\n{secret}=\n" in example, f"{secret} must be empty in .env.example"
    filled = tmp_path / "test.env"
    filled.write_text(example.replace("POSTGRES_PASSWORD=\n", "POSTGRES_PASSWORD=pw\n")
                      .replace("S3_ACCESS_KEY=\n", "S3_ACCESS_KEY=ak\n").replace("S3_SECRET_KEY=\n", "S3_SECRET_KEY=sk\n"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_"))}
    args = [*compose, "-f", str(REPO / "docker" / "docker-compose.yml"), "--env-file"]
    ok = subprocess.run([*args, str(filled), "config"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    import yaml

    cfg = yaml.safe_load(ok.stdout)
    services = cfg["services"]
    assert {"postgres", "prefect-server", "mlflow", "s3", "s3-init", "deploy", "worker-cpu", "worker-gpu"} <= set(services)
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(str(a).startswith("--allowed-hosts") for a in services["mlflow"]["command"])
    assert ":latest" not in services["s3"]["image"]
    missing = subprocess.run([*args, str(REPO / "docker" / ".env.example"), "config"], capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in (missing.stderr + missing.stdout)


def test_compose_file_structure_without_a_client():
    """What `docker compose config` checks above, read from the file itself, so it runs everywhere.

    Secrets are required (`${VAR:?...}`) and never defaulted, third-party images are pinned, the gpu
    worker reserves an NVIDIA device, MLflow restricts its hosts, and every build names a Dockerfile
    that exists.
    """
    import re

    import yaml

    path = REPO / "docker" / "docker-compose.yml"
    text = path.read_text()
    services = yaml.safe_load(text)["services"]
    assert {"postgres", "prefect-server", "mlflow", "s3", "s3-init", "deploy", "worker-cpu", "worker-gpu"} <= set(services)
    for secret in ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        refs = re.findall(r"\$\{" + secret + r"(:[?-][^}]*)?\}", text)
        assert refs, secret
        assert not any(r.startswith(":-") for r in refs), f"{secret} has a default in {path}"
        assert any(r.startswith(":?") for r in refs), f"{secret} is never required in {path}"
    built = {str(svc.get("image")) for svc in services.values() if "build" in svc}
    for name, svc in services.items():
        image = str(svc.get("image", ""))
        if "build" in svc:
            build = svc["build"]
            assert (path.parent / build["context"] / build["dockerfile"]).is_file(), name
            continue
        if image in built:  # our own image, built by another service of this file
            continue
        pinned = image.split(":-", 1)[-1].rstrip("}")  # ${VAR:-default} -> default
        assert ":" in pinned and not pinned.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(str(a).startswith("--allowed-hosts") for a in services["mlflow"]["command"])
    assert "minio/minio" not in text  # the Docker Hub image is gone (2026)


# --------------------------------------------------------------------------- full-pipeline walks the plan


class _FakeRunner:
    """Stands in for full_pipeline's runner: records what it starts, submits and waits for."""

    def __init__(self, remote: bool):
        self.remote, self.log = remote, []

    def start(self, step, uris):
        from llm.stages.registry import STAGES

        assert all(label in uris for label in step.inputs.values()), f"{step.label} started before its inputs"
        if self.remote and STAGES[step.stage].gpu:
            self.log.append(f"submit {step.label}")
            return step.label
        self.log.append(f"run {step.label}")
        uris[step.label] = f"uri-{step.label}"
        return None

    def collect(self, pending):
        self.log.append(f"wait {pending}")
        return {"uri": f"uri-{pending}"}


@pytest.mark.parametrize("remote", [False, True])
def test_full_pipeline_starts_each_step_once_its_inputs_exist(remote):
    """In one process: the plan's order. With deployments: an eval is submitted as soon as its model
    exists and runs while the next training stage trains; the flow waits only for what comes next."""
    from flows.full_pipeline import _run_plan
    from llm.config import load_config
    from llm.stages.pipeline import plan

    steps = plan(load_config("tiny"))
    runner, uris, pending = _FakeRunner(remote), {}, {}
    _run_plan(runner, steps, uris, pending)
    assert set(uris) == {s.label for s in steps} and not pending
    if not remote:
        assert runner.log == [f"run {s.label}" for s in steps]
        return
    data = [f"run {s}" for s in ("download", "filter", "dedup", "tokenizer", "tokenize")]
    assert runner.log == data + [
        "submit pretrain", "wait pretrain", "submit midtrain", "submit eval_pretrain", "wait midtrain",
        "submit sft", "submit eval_midtrain", "wait sft", "submit eval_sft",
        # export reads eval_sft (CORE for its model card) and runs while the other evals may still run
        "wait eval_sft", "run export", "wait eval_pretrain", "wait eval_midtrain", "run report"]


# --------------------------------------------------------------------------- a bare checkpoint through Prefect

from test_data_flow import prefect_env  # noqa: E402,F401  (pytest fixture: a throwaway Prefect server)
from test_eval_stage import upstream  # noqa: E402,F401  (pytest fixture: tokenizer, tokens and model outputs)


def test_eval_on_a_bare_checkpoint_dir_runs_through_the_prefect_stage_task(upstream, prefect_env, tmp_path):  # noqa: F811
    """`kiln eval --checkpoint <dir>` takes a checkpoint directory that is no stage output (a
    ``checkpoints/step_*`` of a running job, the ``final/`` of a training output); so must the
    Prefect stage task, whose cache key is the same content key."""
    from prefect import flow

    from llm.config import load_config
    from llm.stages.output import verify_output
    from llm.storage import Store
    from tasks.stage_tasks import run_stage_task

    ckpt = tmp_path / "step_000007"
    shutil.copytree(Path(upstream["model"]) / "final", ckpt)
    cfg = load_config("tiny", {"run.artifact_root": upstream["root"], "orchestration.result_storage": str(prefect_env),
                               "eval.tasks": ["copa"], "eval.max_per_task": 2, "eval.bpb_tokens": 4096,
                               "eval.sample_max_tokens": 2, "eval.device": "cpu", "eval.nproc": 1})
    inputs = {"model": str(ckpt), "tokenizer": upstream["tokenizer"], "tokens": upstream["tokens"]}

    @flow
    def twice() -> list[tuple[dict, bool]]:
        return [run_stage_task("eval", cfg, inputs, label="eval_step_7") for _ in range(2)]

    (first, cached1), (second, cached2) = twice()
    m = verify_output(Store(upstream["root"]), first["uri"])
    assert m is not None and m["stage"] == "eval" and "core" in m["counts"]
    assert m["inputs"]["model"]["uri"] == str(ckpt)
    assert not cached1 and cached2 and second["uri"] == first["uri"]  # the second is a Prefect cache hit
