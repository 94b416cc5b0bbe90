"""Hostile configuration and setup: bad values are one line naming the key before any compute, devices
that are not there are refused at stage start, and the stack's exposed surfaces (an open --host, secrets
on command lines, pickled Prefect results, checkpoint meta, the bench install) fail safe and say why."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from llm.cli.main import main as kiln
from llm.config import ConfigError, load_config
from llm.dist import check_devices
from s3_server import moto_server, s3_bucket  # noqa: F401  (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]


def _config_error(overrides: list[str] | dict[str, Any], preset: str = "tiny") -> str:
    with pytest.raises(ConfigError) as e:
        load_config(preset, overrides)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _one_line_stderr(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("override, expected", [
    ("pretrain.steps=-5", "pretrain.steps: must be >= 1 (got -5)"),
    ("pretrain.steps=0", "pretrain.steps: must be >= 1 (got 0)"),
    ("midtrain.steps=0", "midtrain.steps: must be >= 1"),
    ("sft.steps=-1", "sft.steps: must be >= 1"),
    ("sft.epochs=0", "sft.epochs: must be >= 1"),
    ("pretrain.lr=-1", "pretrain.lr: must be > 0 (got -1)"),
    ("midtrain.lr=0", "midtrain.lr: must be > 0"),
    ("sft.lr=-0.001", "sft.lr: must be > 0"),
    ("pretrain.embedding_lr=-1", "pretrain.embedding_lr: must be >= 0"),
    ("pretrain.device_batch_size=0", "pretrain.device_batch_size: must be >= 1 (got 0)"),
    ("sft.device_batch_size=-4", "sft.device_batch_size: must be >= 1"),
    ("midtrain.total_batch_tokens=0", "midtrain.total_batch_tokens: must be >= 1"),
    ("model.seq_len=0", "model.seq_len: must be >= 1"),
    ("model.window_pattern=SXL", "model.window_pattern: String should match pattern '^[SL]+$' (got 'SXL')"),
    ("pretrain.warmup_steps=-1", "pretrain.warmup_steps: must be >= 0"),
    ("pretrain.warmdown_frac=1.5", "pretrain.warmdown_frac: must be <= 1 (got 1.5)"),
    ("midtrain.warmdown_frac=-0.1", "midtrain.warmdown_frac: must be >= 0"),
    ("sft.min_lr_frac=2", "sft.min_lr_frac: must be <= 1"),
    ("midtrain.chat_ratio=1.5", "midtrain.chat_ratio: must be <= 1"),
    ("pretrain.beta2=1", "pretrain.beta2: must be < 1"),
    ("pretrain.log_every=0", "pretrain.log_every: must be >= 1"),
    ("pretrain.nproc=0", "pretrain.nproc: must be an integer >= 1 or 'auto' (got 0)"),
    ("eval.nproc=-2", "eval.nproc: must be an integer >= 1 or 'auto'"),
    ("eval.batch_tokens=0", "eval.batch_tokens: must be >= 1"),
    ("eval.bpb_tokens=0", "eval.bpb_tokens: must be >= 1"),
    ("eval.max_seq_len=0", "eval.max_seq_len: must be >= 1"),
    ("eval.max_per_task=0", "eval.max_per_task: must be >= 1"),
    ("eval.stages=[pretrain, sfft]", "eval.stages.1: Input should be 'pretrain', 'midtrain' or 'sft' (got 'sfft')"),
    ("pretrain.device=mps", "pretrain.device: Input should be 'auto', 'cpu' or 'cuda' (got 'mps')"),
])
def test_a_bad_value_is_one_line_naming_its_key(override: str, expected: str) -> None:
    msg = _config_error([override])
    assert msg.startswith(expected), msg
    assert f"preset 'tiny', overrides {override.split('=')[0]}" in msg  # where the value came from


@pytest.mark.parametrize("overrides, key", [
    ({"pretrain.steps": None, "pretrain.target_param_data_ratio": 0}, "pretrain.target_param_data_ratio: must be > 0"),
    ({"pretrain.steps": None, "pretrain.target_param_data_ratio": -20}, "pretrain.target_param_data_ratio: must be > 0"),
    ({"pretrain.steps": None, "pretrain.target_flops": 0}, "pretrain.target_flops: must be > 0"),
    ({"midtrain.steps": None, "midtrain.target_flops": -1e18}, "midtrain.target_flops: must be > 0"),
])
def test_every_token_budget_source_must_be_positive(overrides: dict[str, Any], key: str) -> None:
    """steps, a FLOPs target or a tokens-per-param ratio: a zero or negative one would 'finish' untrained."""
    assert _config_error(overrides).startswith(key)


def test_positive_budgets_resolve_to_at_least_one_step() -> None:
    from llm.train.trainer import plan_tokens

    for overrides in ({"pretrain.steps": 1}, {"pretrain.steps": None, "pretrain.target_flops": 1.0},
                      {"pretrain.steps": None, "pretrain.target_param_data_ratio": 1e-9}):
        plan = plan_tokens(load_config("tiny", overrides).pretrain, num_params=1000, flops_per_token=6000)
        assert plan["steps"] >= 1 and plan["tokens"] > 0, overrides


def test_an_indivisible_batch_names_the_keys() -> None:
    msg = _config_error(["pretrain.total_batch_tokens=1000"])
    assert msg.startswith("pretrain.total_batch_tokens: 1000 is not a multiple of pretrain.device_batch_size 8 "
                          "× model.seq_len 256 = 2048 tokens per micro-step"), msg
    # a fixed process count multiplies the micro-batch: 4096 splits over 1 or 2 ranks, not 3
    load_config("tiny", ["pretrain.nproc=2"])
    assert "× pretrain.nproc 3 = 6144" in _config_error(["pretrain.nproc=3"])
    # the model's seq_len is shared by every training stage: each stage that no longer divides is named
    msg = _config_error(["model.seq_len=384"])
    assert all(f"{s}.total_batch_tokens" in msg for s in ("pretrain", "midtrain", "sft")), msg


@pytest.mark.parametrize("preset", ["tiny", "d12", "d20"])
def test_shipped_presets_still_validate(preset: str) -> None:
    load_config(preset)


def test_invalid_yaml_is_one_line_with_its_position(tmp_path: Path) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text("pretrain:\n  steps: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{p}:3:"), str(e.value)


def test_cli_refuses_negative_steps_before_anything_runs(artifact_root: Path, capsys) -> None:
    """The issue's case: this used to train nothing and publish `ok steps=0 tokens=0`."""
    assert kiln(["pretrain", "--preset", "tiny", "--output", str(artifact_root), "--set", "pretrain.steps=-5"]) == 2
    err = _one_line_stderr(capsys)
    assert err.startswith("kiln: config error: pretrain.steps: must be >= 1 (got -5)"), err
    assert not any(artifact_root.iterdir())  # not even the download ran


# --------------------------------------------------------------------------- devices


@pytest.fixture()
def machine(monkeypatch: pytest.MonkeyPatch):
    """Pretend this machine has ``n`` CUDA devices (0 = none), whatever it really has."""
    import torch

    def set_gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_gpus


def _published(root: Path, stage: str) -> str:
    """A finished output of ``stage`` (one small file): enough to be a downstream stage's input."""
    from llm.stages.output import run_stage
    from llm.storage import Store

    def write(out, inputs):
        out.path("x.txt").write_text(stage)
        return {"counts": {}}

    return run_stage(Store(str(root)), stage, {}, {}, "1", write).uri


def test_cuda_on_a_machine_without_it_is_one_line_before_torchrun(artifact_root: Path, capsys, machine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    machine(0)
    launched: list[str] = []
    real_popen = subprocess.Popen

    def spy(cmd, *a, **kw):  # every process started from here on, torchrun included
        launched.append(" ".join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else str(cmd))
        return real_popen(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    # The config itself is fine here: it may be meant for a GPU worker elsewhere.
    assert kiln(["config", "--set", "pretrain.device=cuda"]) == 0
    capsys.readouterr()
    tokens, tok = _published(artifact_root, "tokenize"), _published(artifact_root, "tokenizer")
    rc = kiln(["pretrain", "--output", str(artifact_root), "--input", f"tokens={tokens}", "--input", f"tokenizer={tok}",
               "--set", "pretrain.device=cuda"])
    assert rc == 2
    err = _one_line_stderr(capsys)
    assert err.startswith("kiln: config error: pretrain.device: cuda requested but torch.cuda.is_available() is False"), err
    assert not [c for c in launched if "torch.distributed.run" in c] and not list(artifact_root.rglob("job.json"))


def test_more_processes_than_gpus_names_nproc(machine) -> None:
    machine(1)
    check_devices(load_config("tiny", {"midtrain.device": "auto", "midtrain.nproc": 1}), "midtrain")
    with pytest.raises(ConfigError, match=r"^midtrain\.nproc: 2 processes but only 1 CUDA device\(s\) visible"):
        check_devices(load_config("tiny", {"midtrain.device": "auto", "midtrain.nproc": 2}), "midtrain")
    with pytest.raises(ConfigError, match=r"^eval\.nproc: 4 processes"):
        check_devices(load_config("tiny", {"eval.device": "cuda", "eval.nproc": 4}), "eval")
    machine(0)
    with pytest.raises(ConfigError, match=r"^sft\.device: cuda requested"):
        check_devices(load_config("tiny", {"sft.device": "cuda"}), "sft")
    # CPU ranks (gloo) need no GPU, and "auto" falls back to the CPU
    check_devices(load_config("tiny", {"pretrain.device": "cpu", "pretrain.nproc": 2}), "pretrain")
    check_devices(load_config("tiny", {"eval.device": "auto", "eval.nproc": 2}), "eval")


def test_a_finished_stage_is_reused_on_a_machine_without_its_devices(artifact_root: Path, machine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The device check is for computing: reading a GPU-trained output on a laptop must still work."""
    from llm.stages.registry import execute

    def fake_pretrain(cfg, out, inputs, *, progress):
        out.path("final/model.safetensors").write_bytes(b"weights")
        return {"counts": {"steps": cfg.pretrain.steps}}

    monkeypatch.setattr("llm.train.stages.run_pretrain", fake_pretrain)
    cfg = load_config("tiny", {"run.artifact_root": str(artifact_root), "pretrain.device": "cuda"})
    inputs = {"tokens": _published(artifact_root, "tokenize"), "tokenizer": _published(artifact_root, "tokenizer")}
    machine(1)
    assert execute("pretrain", cfg, inputs, progress=False).cached is False
    machine(0)
    assert execute("pretrain", cfg, inputs, progress=False).cached is True
    with pytest.raises(ConfigError, match=r"^pretrain\.device"):
        execute("pretrain", cfg, inputs, force=True, progress=False)


# --------------------------------------------------------------------------- checkpoint meta


def _checkpoint(tmp_path: Path) -> Path:
    import torch

    from llm.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "ckpt", model_state={"w": torch.zeros(2)}, meta={"step": 1, "model_config": {}})


@pytest.mark.parametrize("files, says", [
    (None, "no 'files' table"),
    ([], "'files' entry that is a list, not a table"),
    ({"model.safetensors": {"sha256": "ab"}}, "files['model.safetensors'] needs an integer 'size'"),
])
def test_checkpoint_meta_without_a_files_table_says_so(tmp_path: Path, files: Any, says: str) -> None:
    from llm.checkpoint import CheckpointError, verify_checkpoint

    ckpt = _checkpoint(tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    if files is None:
        del meta["files"]
    else:
        meta["files"] = files
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(ckpt)
    assert str(e.value).startswith(f"{ckpt / 'meta.json'}: ") and says in str(e.value), str(e.value)
    assert "has no model.safetensors" not in str(e.value)


# --------------------------------------------------------------------------- kiln stack --host


def _stack_up_on_a_busy_port(tmp_path: Path, host: str) -> tuple[int, str, Path]:
    import socket

    with socket.socket() as busy:
        busy.bind((host, 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = kiln(["stack", "up", "--home", str(tmp_path / "s"), "--host", host, "--prefect-port", str(port),
                   "--mlflow-port", "0"])
    return rc, port, tmp_path / "s"


def test_stack_on_a_public_address_warns_that_the_servers_have_no_auth(tmp_path: Path, capsys) -> None:
    rc, port, home = _stack_up_on_a_busy_port(tmp_path, "0.0.0.0")
    assert rc == 1 and not list((home / "pids").glob("*.pid"))  # refused (busy port) before spawning anything
    lines = capsys.readouterr().err.splitlines()
    warning = [ln for ln in lines if "warning" in ln]
    assert len(warning) == 1 and "--host 0.0.0.0" in warning[0] and "no authentication" in warning[0], lines
    assert "reverse proxy" in warning[0] and "SSH tunnel" in warning[0]
    heading = re.search(r"README: ([^)]+)\)", warning[0]).group(1)
    assert f"### {heading}\n" in (REPO / "README.md").read_text()  # the section the warning points to exists


def test_stack_on_loopback_does_not_warn(tmp_path: Path, capsys) -> None:
    rc, _, _ = _stack_up_on_a_busy_port(tmp_path, "127.0.0.1")
    assert rc == 1 and "warning" not in capsys.readouterr().err


# --------------------------------------------------------------------------- docker compose


def test_compose_puts_no_secret_on_a_command_line() -> None:
    """`ps` on the host shows every container's argv to every user; the environment it does not."""
    import yaml

    services = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())["services"]
    # ${VAR} is substituted by compose into the argv; $${VAR} is left for the container's shell.
    secret = re.compile(r"(?<!\$)\$\{?(POSTGRES_PASSWORD|S3_SECRET_KEY|S3_ACCESS_KEY)\b")
    for name, svc in services.items():
        for field in ("command", "entrypoint"):
            argv = svc.get(field) or []
            text = " ".join(argv) if isinstance(argv, list) else str(argv)
            assert not secret.search(text), f"{name}.{field} carries a secret: {text}"
    mlflow = services["mlflow"]
    assert not any(str(a).startswith("--backend-store-uri") for a in mlflow["command"])
    assert "${POSTGRES_PASSWORD}" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]


def test_installed_mlflow_server_reads_the_backend_store_uri_from_the_environment() -> None:
    from mlflow.cli import cli

    option = next(p for p in cli.commands["server"].params if p.name == "backend_store_uri")
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"


# --------------------------------------------------------------------------- Prefect results


@pytest.fixture()
def prefect_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from prefect.settings import PREFECT_HOME, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    with temporary_settings(updates={PREFECT_HOME: tmp_path / "prefect-home", PREFECT_LOGGING_TO_API_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


def test_a_stage_tasks_persisted_result_is_plain_json(prefect_server, tmp_path: Path) -> None:
    from prefect import flow

    from tasks.stage_tasks import run_stage_task

    results = tmp_path / "results"
    cfg = load_config("tiny", {"run.artifact_root": str(tmp_path / "artifacts"), "orchestration.result_storage": str(results),
                               "download.max_files": 1, "download.max_rows": 20})

    @flow
    def one_stage() -> tuple[dict[str, Any], bool]:
        return run_stage_task("download", cfg, {})

    summary, cached = one_stage()
    (record_file,) = results.iterdir()
    record = json.loads(record_file.read_bytes())
    assert record["metadata"]["serializer"]["type"] == "json"
    assert json.loads(record["result"]) == summary and summary["uri"].endswith(summary["key"])
    again, cached_again = one_stage()  # the JSON record is what the cache hit reads back
    assert (cached, cached_again) == (False, True) and again == summary

    # A failed stage's exception is recorded as JSON too (type and message), not pickled.
    cfg = cfg.model_copy(update={"download": cfg.download.model_copy(update={"source": str(tmp_path / "none/*.parquet")})})
    with pytest.raises(Exception, match="no parquet files match"):
        one_stage()
    records = [json.loads(p.read_bytes()) for p in results.iterdir() if p != record_file]
    assert [r["metadata"]["serializer"]["type"] for r in records] == ["json"]
    assert json.loads(records[0]["result"]) == {"error": "DownloadError",
                                                "message": f"no parquet files match {tmp_path / 'none/*.parquet'}"}


def test_s3_result_storage_never_decodes_a_record_naming_another_serializer(s3_bucket, tmp_path: Path) -> None:
    """Prefect decodes a record with the serializer written inside it, even to check that it exists: a
    record rewritten as pickle would run its payload on every worker that looks the stage up."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.results import ResultStore
    from prefect.serializers import PickleSerializer

    from tasks.results import RESULT_SERIALIZER, KilnS3ResultStorage, UntrustedResultRecord

    block = KilnS3ResultStorage(basepath=f"s3://{s3_bucket.name}/prefect-results",
                                endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    store = ResultStore(result_storage=block, serializer=RESULT_SERIALIZER)

    def put(key: str, serializer: Any, value: Any) -> None:
        rec = ResultRecord(metadata=ResultRecordMetadata(serializer=serializer, storage_key=key), result=value)
        block.write_path(key, rec.serialize(), _sync=True)

    put("good", RESULT_SERIALIZER, {"uri": "s3://b/sft/k", "counts": {"steps": 3}})
    assert store.exists("good") and store.read("good").result == {"uri": "s3://b/sft/k", "counts": {"steps": 3}}

    sentinel = tmp_path / "payload-ran"
    put("evil", PickleSerializer(), _Payload(str(sentinel)))
    assert not store.exists("evil")  # no record, so the stage's own manifest check decides
    with pytest.raises(UntrustedResultRecord, match="names serializer 'pickle'"):
        block.read_path("evil", _sync=True)
    put("sneaky", RESULT_SERIALIZER.model_copy(update={"object_decoder": "os.mkdir"}), {"x": 1})
    assert not store.exists("sneaky")
    assert not sentinel.exists()


class _Payload:
    """Unpickling this makes a directory: the stand-in for arbitrary code in a tampered record."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --------------------------------------------------------------------------- make bench


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def test_make_bench_installs_what_the_benches_import() -> None:
    """A fresh clone's `make bench` must not die on an import: it installs the bench extra first, and that
    extra (with the core and dev dependencies) provides every third-party module bench/*.py imports."""
    from importlib.metadata import packages_distributions

    plan = subprocess.run(["make", "-n", "-B", "bench"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    install = next((ln for ln in plan.splitlines() if "pip install" in ln and "bench" in ln), None)
    assert install is not None, plan
    assert plan.index(install) < plan.index("bench/bench_*.py"), plan

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = _requirement_names(project["dependencies"] + extras["dev"] + extras["bench"])
    assert {"datatrove", "spacy"} <= _requirement_names(extras["bench"])  # spaCy: datatrove's word tokenizer

    local = {p.stem for d in ("bench", "tests") for p in (REPO / d).glob("*.py")} | {"llm", "tasks", "flows"}
    # The reference checkout the vs-nanochat benches import from `--nanochat DIR` (not a dependency: without
    # it they print how to get it and exit 0, which the next test checks).
    local |= {"nanochat"}
    dists = packages_distributions()
    for path in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - local:
                provided_by = {d.lower().replace("_", "-") for d in dists.get(top, [])}
                assert provided_by & declared, f"{path.name} imports {top}, which no declared dependency provides"


def test_vs_nanochat_benches_without_a_checkout_say_how_to_get_one_and_exit_0(tmp_path: Path) -> None:
    """`make bench` on a machine without nanochat must not fail: each vs-nanochat bench explains and exits 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NANOCHAT_DIR": str(tmp_path / "absent")}
    for path in sorted((REPO / "bench").glob("bench_vs_nanochat_*.py")):
        r = subprocess.run([sys.executable, str(path), "--nanochat", str(tmp_path / "absent")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (path.name, r.stderr[-2000:])
        assert "git clone https://github.com/karpathy/nanochat" in r.stdout + r.stderr, path.name
