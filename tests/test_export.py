"""`kiln export --format hf`: the exported directory is Kiln's model, loaded by transformers.

transformers runs on CPU with no network (HF_HUB_OFFLINE). Two paths: stock transformers' NanoChat for
every model it expresses (no custom code), and Kiln's own code with ``trust_remote_code=True`` for one it
cannot (the "swa" shape: sliding-window attention, whose window of 128 tokens is shorter than the prompts).
The proof that each is exact is numerical and behavioural: the logits agree within 1e-4 on random and real
prompts, greedy generation picks the same tokens, the chat template gives the ids (and the supervision
mask) of Kiln's renderer, and the HF tokenizer gives tiktoken's ids on held-out kit text. The models are
tiny and their weights random at a scale where every block matters (Kiln's init zeroes the residual
projections, which would leave attention and MLP untested).
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from llm.chat.format import DropRow, render_conversation, render_prompt, validate
from llm.checkpoint import save_checkpoint
from llm.model import GPT, GPTConfig
from llm.data.tokenizer import train_tokenizer
from llm.export import NANOCHAT_FIELDS
from llm.tokenizer import HF_TOKENIZER_FILE, load_tokenizer

pytest.importorskip("transformers")

VOCAB = 512
# Two shapes: full multi-head attention with the soft-cap, and grouped-query attention without it.
SHAPES = {
    "mha": dict(depth=2, aspect_ratio=32, head_dim=16, n_kv_heads=None, seq_len=64, softcap=15.0),
    "gqa": dict(depth=3, aspect_ratio=16, head_dim=16, n_kv_heads=1, seq_len=64, softcap=0.0, rope_base=500.0),
    # NanoChat has no sliding windows: the remote-code path. seq_len 512 makes the short window 128.
    "swa": dict(depth=4, aspect_ratio=16, head_dim=16, n_kv_heads=2, seq_len=512, window_pattern="SSSL"),
    # nanochat HEAD's newer pieces (value embeddings, smear, backout): NanoChat has none, remote code again.
    "recipe": dict(depth=3, aspect_ratio=16, head_dim=16, n_kv_heads=1, seq_len=64, value_embeds=True, smear=True,
                   backout=True),
}
STOCK = ("gqa", "mha")


@pytest.fixture(scope="module", autouse=True)
def _offline_one_thread() -> None:
    import os

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _kit_texts(shared_data: Path, shard: int, n: int, cap: int = 3000) -> list[str]:
    col = pq.read_table(shared_data / "pretrain" / f"shard_{shard:05d}.parquet", columns=["text"]).column("text")
    return [t[:cap] for t in col.slice(0, n).to_pylist()]


def _kit_chats(shared_data: Path, split: str, n: int) -> list[list[dict]]:
    rows = pq.read_table(shared_data / "chat" / f"{split}.parquet", columns=["messages"]).column("messages")
    return [list(m) for m in rows.slice(0, n).to_pylist()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A BPE trained on kit documents (shard 0) and conversations, saved as the tokenizer stage does."""
    texts = _kit_texts(shared_data, 0, 150) + [m["content"][:2000] for c in _kit_chats(shared_data, "train", 300) for m in c]
    tok, hf = train_tokenizer(texts, VOCAB)
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    hf.save(str(d / HF_TOKENIZER_FILE))
    return d


def random_model(vocab: int, seed: int, **shape) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, **shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "wte.weight":
                # Every other row tiny (a rarely seen token's, in a trained model): where RMSNorm's eps
                # shows. With unit rows only, NanoChat's default eps (1e-6 instead of Kiln's 1.2e-7)
                # moves the logits by ~1e-5 and would pass unnoticed; with these rows, by ~4.
                p.normal_(0.0, 1.0)
                p[1::2] *= 1e-3
            elif p.dim() < 2:  # the recipe options' scalar gates (smear, backout): non-zero, so they act
                p.fill_(0.5)
            else:  # unit-variance outputs; lm_head larger so that the soft-cap is exercised
                p.normal_(0.0, (4.0 if name == "lm_head.weight" else 1.0) / p.shape[1] ** 0.5)
    return model.eval()


def write_checkpoint(model: GPT, path: Path, **meta) -> Path:
    return save_checkpoint(path, model_state=model.state_dict(),
                           meta={"step": 7, "model_config": model.config.to_dict(), **meta})


@pytest.fixture(scope="module", params=sorted(SHAPES))
def exported(request, tmp_path_factory: pytest.TempPathFactory, tok_dir: Path):
    """(Kiln model, tokenizer, HF model, HF tokenizer, export dir) for one shape."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.export import export_to_dir

    tok = load_tokenizer(str(tok_dir))
    model = random_model(tok.vocab_size, seed=len(request.param), **SHAPES[request.param])
    base = tmp_path_factory.mktemp(f"export-{request.param}")
    write_checkpoint(model, base / "run" / "final")
    out = base / "hf"
    export_to_dir(str(base / "run"), str(tok_dir), out)
    remote = request.param not in STOCK
    hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    return model, tok, hf_model, AutoTokenizer.from_pretrained(out), out


# --------------------------------------------------------------------------- the model


def test_export_loads_with_stock_transformers_classes_unless_it_needs_kilns_code(exported) -> None:
    from transformers import AutoModelForCausalLM

    model, tok, hf_model, hf_tok, out = exported
    config = json.loads((out / "config.json").read_text())
    if model.config.to_dict().keys() <= NANOCHAT_FIELDS:
        assert type(hf_model).__name__ == "NanoChatForCausalLM"
        assert type(hf_model).__module__.startswith("transformers.models.nanochat")  # shipped code, not remote
        assert not list(out.glob("*.py")) and "auto_map" not in config
        assert "trust_remote_code" not in (out / "README.md").read_text().split("## Architecture")[0].replace(
            "no `trust_remote_code` needed", "")
    else:
        assert type(hf_model).__name__ == "KilnForCausalLM" and config["model_type"] == "kiln"
        assert type(hf_model).__module__.startswith("transformers_modules.")  # the directory's own code
        assert sorted(p.name for p in out.glob("*.py")) == ["configuration_kiln.py", "kiln_gpt.py", "modeling_kiln.py"]
        # The model code is Kiln's, byte for byte: nothing to drift from llm/model.py.
        assert (out / "kiln_gpt.py").read_bytes() == Path(inspect.getsourcefile(GPT)).read_bytes()
        assert config["kiln"] == model.config.to_dict()
        card = (out / "README.md").read_text()
        on = {k: v for k, v in model.config.to_dict().items() if k not in NANOCHAT_FIELDS}
        assert "needs `trust_remote_code=True`" in card and all(f"`{k}={v!r}`" in card for k, v in on.items())
        assert "trust_remote_code=True" in card.split("```python")[1]
        with pytest.raises(ValueError, match="trust_remote_code"):  # transformers' documented refusal
            AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert sum(p.numel() for p in hf_model.parameters()) == model.num_params()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.special_id("<|assistant_end|>"), tok.bos_id]


def test_logits_equal_kilns_on_random_and_real_prompts(exported, shared_data: Path) -> None:
    model, tok, hf_model, _, _ = exported
    T = model.config.seq_len
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tok.vocab_size, (3, T), generator=g)]
    # Real text the tokenizer never saw (shard 2), as Kiln feeds documents: BOS first.
    for text in _kit_texts(shared_data, 2, 4):
        prompts.append(torch.tensor([[tok.bos_id, *tok.encode(text)][:T]]))
    prompts.append(torch.tensor([render_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])]))
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            diff = (model(ids) - hf_model(ids).logits).abs().max().item()
            worst = max(worst, diff)
    print(f"max |logit diff| over {len(prompts)} prompts: {worst:.3g}")
    assert worst < 1e-4


def test_greedy_generation_picks_the_same_tokens(exported, shared_data: Path) -> None:
    model, tok, hf_model, hf_tok, _ = exported
    stops = {tok.special_id("<|assistant_end|>"), tok.bos_id}
    prompts = [render_prompt(tok, [{"role": "user", "content": q}])
               for q in ("Write a short poem about the sea.", "How many legs does a spider have?")]
    # A document prompt filling the context up to the last 24 tokens: past a short window, if any.
    doc = [tok.bos_id, *tok.encode(_kit_texts(shared_data, 2, 1)[0])][: model.config.seq_len - 24]
    for ids in [*prompts, doc]:
        ours = list(model.generate(ids, 24, temperature=0.0, stop_ids=stops))
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=24)
        theirs = out[0, len(ids):].tolist()
        assert theirs == ours, len(ids)


# --------------------------------------------------------------------------- the tokenizer and chat template


def test_chat_template_renders_exactly_as_sft_saw_it(exported, shared_data: Path) -> None:
    _, tok, _, hf_tok, _ = exported
    convs = _kit_chats(shared_data, "val", 40)
    convs.append([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Grass?"},
                  {"role": "assistant", "content": "Green."}])
    checked = 0
    for raw in convs:
        try:
            msgs = validate(raw, 20_000)
        except DropRow:
            continue
        ids, mask = render_conversation(tok, msgs)
        got = hf_tok.apply_chat_template(raw, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert got["input_ids"] == ids
        assert got["assistant_masks"] == mask  # the tokens SFT trained on: replies and their end token
        prompt = hf_tok.apply_chat_template(raw[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert prompt["input_ids"] == render_prompt(tok, raw[:-1])
        checked += 1
    assert checked >= 30
    with pytest.raises(Exception, match="unknown role"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _assert_same_ids(hf_tok, tok, texts: list[str]) -> int:
    n = 0
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok(text)["input_ids"] == [tok.bos_id, *ids]  # BOS first, as every training document
        assert hf_tok.decode(ids) == text
        n += len(ids)
    return n


def test_hf_tokenizer_gives_tiktokens_ids_on_held_out_text(exported, shared_data: Path) -> None:
    _, tok, _, hf_tok, _ = exported
    texts = _kit_texts(shared_data, 3, 60, cap=20_000)  # shard 3: not in the tokenizer's training text
    n = _assert_same_ids(hf_tok, tok, texts)
    print(f"{len(texts)} held-out documents, {n} tokens: identical ids")


def test_tokenizer_without_hf_file_is_built_from_the_ranks(tmp_path: Path, tok_dir: Path, shared_data: Path) -> None:
    """A tokenizer output with only Kiln's tokenizer.json (stock encodings, older outputs) exports too."""
    from transformers import AutoTokenizer

    from llm.export import export_to_dir

    bare = tmp_path / "tok"
    bare.mkdir()
    for name in ("tokenizer.json", "token_bytes.npy"):
        shutil.copy(tok_dir / name, bare / name)
    tok = load_tokenizer(str(bare))
    write_checkpoint(random_model(tok.vocab_size, 1, **SHAPES["mha"]), tmp_path / "ckpt")
    export_to_dir(str(tmp_path / "ckpt"), str(bare), tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    _assert_same_ids(hf_tok, tok, _kit_texts(shared_data, 3, 60, cap=20_000))


# --------------------------------------------------------------------------- bad input, through the CLI


def _kiln(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from llm.cli.main import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture()
def checkpoint(tmp_path: Path, tok_dir: Path) -> Path:
    tok = load_tokenizer(str(tok_dir))
    return write_checkpoint(random_model(tok.vocab_size, 2, **SHAPES["mha"]), tmp_path / "ckpt")


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path: Path, checkpoint: Path, tok_dir: Path, capsys) -> None:
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte: only the hash can tell
    weights.write_bytes(bytes(data))
    out = tmp_path / "hf"
    code, err = _kiln(["export", "--checkpoint", str(checkpoint), "--tokenizer", str(tok_dir), "--output", str(out)], capsys)
    assert code == 1
    assert f"{weights}: SHA-256 mismatch" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".hf.export-*"))


def test_non_empty_output_is_refused_unless_forced(tmp_path: Path, checkpoint: Path, tok_dir: Path, capsys) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["export", "--checkpoint", str(checkpoint), "--tokenizer", str(tok_dir), "--format", "hf", "--output", str(out)]
    code, err = _kiln(argv, capsys)
    assert code == 1 and "not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, err = _kiln([*argv, "--force"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    code, err = _kiln([*argv, "--force"], capsys)  # again over its own export: replaced, still loadable
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "nanochat"


def test_architecture_option_nanochat_cannot_express_is_refused_by_name_without_remote_code(
        tmp_path: Path, tok_dir: Path, capsys) -> None:
    tok = load_tokenizer(str(tok_dir))
    model = random_model(tok.vocab_size, 3, **SHAPES["swa"])
    ckpt = write_checkpoint(model, tmp_path / "ckpt")
    argv = ["export", "--checkpoint", str(ckpt), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "hf")]
    code, err = _kiln([*argv, "--no-remote-code"], capsys)
    assert code == 1
    assert "window_pattern='SSSL' cannot be expressed by transformers' nanochat architecture" in err
    assert not (tmp_path / "hf").exists()
    # A pattern whose layers all come out full (one layer: the last is always full) is NanoChat's.
    one = random_model(tok.vocab_size, 3, **{**SHAPES["mha"], "depth": 1, "window_pattern": "S"})
    code, err = _kiln(["export", "--checkpoint", str(write_checkpoint(one, tmp_path / "one")), "--tokenizer",
                       str(tok_dir), "--output", str(tmp_path / "hf1"), "--no-remote-code"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "hf1" / "config.json").read_text())["model_type"] == "nanochat"
    # By default the same windowed model exports with Kiln's code; forcing a stock export over it later
    # leaves no stale code behind.
    code, err = _kiln(argv, capsys)
    assert code == 0, err
    assert (tmp_path / "hf" / "modeling_kiln.py").is_file()
    code, err = _kiln(["export", "--checkpoint", str(tmp_path / "one"), "--tokenizer", str(tok_dir), "--output",
                       str(tmp_path / "hf"), "--force"], capsys)
    assert code == 0, err
    assert not list((tmp_path / "hf").glob("*.py"))


# --------------------------------------------------------------------------- the pipeline stage


def test_export_stage_is_cached_and_its_card_holds_lineage_tokens_and_scores(artifact_root: Path, tok_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.config import load_config
    from llm.stages.output import run_stage
    from llm.stages.registry import execute
    from llm.storage import Store

    store = Store(str(artifact_root))
    tok = load_tokenizer(str(tok_dir))

    def tokenizer_fn(out, inputs):
        for name in ("tokenizer.json", "token_bytes.npy", HF_TOKENIZER_FILE):
            shutil.copy(tok_dir / name, out.path(name))
        return {"counts": {"vocab_size": tok.vocab_size}}

    tok_uri = run_stage(store, "tokenizer", {"t": 1}, {}, "test", tokenizer_fn).uri
    model = random_model(tok.vocab_size, 4, **SHAPES["gqa"])

    def sft_fn(out, inputs):
        write_checkpoint(model, out.workdir / "final")
        return {"counts": {"tokens": 12_288, "steps": 3}}

    sft = run_stage(store, "sft", {"s": 1}, {"tokenizer": tok_uri}, "test", sft_fn)

    def eval_fn(out, inputs):
        out.path("core.json").write_text("{}")
        return {"counts": {"core": 0.1234, "bpb": 1.875}, "core_label": "CORE-22"}

    ev = run_stage(store, "eval", {"e": 1}, {"model": sft.uri, "tokenizer": tok_uri}, "test", eval_fn)
    cfg = load_config("tiny", [f"run.artifact_root={artifact_root}"])
    inputs = {"model": sft.uri, "tokenizer": tok_uri, "eval": ev.uri}
    first = execute("export", cfg, inputs, progress=False)
    assert not first.cached
    again = execute("export", cfg, inputs, progress=False)
    assert again.cached and again.uri == first.uri

    card = (Path(first.uri) / "README.md").read_text()
    for m in (sft.manifest, ev.manifest, json.loads((Path(tok_uri) / "manifest.json").read_text())):
        if m["stage"] != "eval":
            assert f"`{m['key']}` | `{m['hash']}`" in card  # lineage: key and manifest hash
    assert "| sft | 12,288 |" in card and "| CORE-22 | 0.1234 |" in card and "| bits per byte | 1.8750 |" in card
    assert first.manifest["counts"]["core"] == 0.1234

    hf_model = AutoModelForCausalLM.from_pretrained(first.uri).eval()
    hf_tok = AutoTokenizer.from_pretrained(first.uri)
    ids = hf_tok("The stage output is a model directory.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (hf_model(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_kiln_run_exports_the_sft_model_after_its_eval_and_before_the_report(monkeypatch) -> None:
    """The chain's order and the export's inputs, with every stage's work replaced by a record of the call."""
    import llm.stages.pipeline as pipeline
    from llm.config import load_config
    from llm.stages.output import StageResult

    calls: list[tuple[str, dict[str, str]]] = []

    def fake_execute(name, cfg, inputs, **kw):
        calls.append((name, inputs))
        return StageResult(uri=f"{name}-{len(calls)}", manifest={"stage": name}, cached=False)

    monkeypatch.setattr(pipeline, "execute", fake_execute)
    results = pipeline.run_pipeline(load_config("tiny"), progress=False)
    order = [name for name, _ in calls]
    assert order.index("export") > max(i for i, n in enumerate(order) if n == "eval") and order[-1] == "report"
    export = dict(calls)["export"]
    assert export == {"model": results["sft"].uri, "tokenizer": results["tokenizer"].uri, "eval": results["eval_sft"].uri}
    assert dict(calls)["report"]["export"] == results["export"].uri  # the report lists the export dir

    calls.clear()
    pipeline.run_pipeline(load_config("tiny"), until="export", progress=False)
    assert [n for n, _ in calls][-1] == "export"


# --------------------------------------------------------------------------- MLflow 3: logged models, registry


def test_mlflow_logged_model_eval_metrics_and_registered_version(tmp_path: Path, artifact_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (tiny) training run logs its final checkpoint as a LoggedModel with the run's params and
    system metrics; eval metrics land on that model with their datasets' digests; the export stage
    registers it as a version of kiln-<preset> with the lineage in its tags and the alias ``current``.
    All read back through MlflowClient from a sqlite store (what an MLflow server keeps)."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    from train_fixtures import tiny_job, write_token_shards

    from llm.config import load_config
    from llm.eval.stage import _log_mlflow
    from llm.stages.output import run_stage
    from llm.stages.registry import execute
    from llm.storage import Store

    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)

    tok, hf = train_tokenizer(["the cat sat on the mat, and the dog sat on the log."] * 40, 300)

    def tokenizer_fn(out, inputs):
        tok.save(out.workdir)
        hf.save(str(out.path(HF_TOKENIZER_FILE)))
        return {"counts": {"vocab_size": tok.vocab_size}}

    tok_uri = run_stage(Store(str(artifact_root)), "tokenizer", {"t": 2}, {}, "test", tokenizer_fn).uri
    shards = write_token_shards(tmp_path / "shards", vocab=tok.vocab_size, n_docs=60, val_docs=10)
    job = tiny_job(shards, tmp_path / "train", steps=4, eval_every=4, ckpt_every=4)
    job["model"]["vocab_size"] = tok.vocab_size
    job["mlflow"] = {"enabled": True, "tracking_uri": uri, "experiment": "kiln-test", "run_name": "pretrain"}
    (tmp_path / "job.json").write_text(json.dumps(job))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    env.pop("KILN_MLFLOW_RUN_ID", None)
    res = subprocess.run([sys.executable, "-m", "llm.train.trainer", "--job", str(tmp_path / "job.json")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    meta = json.loads((tmp_path / "train" / "final" / "meta.json").read_text())
    run_id = meta["mlflow_run_id"]

    # The final checkpoint is a LoggedModel of its training run, with that run's params.
    run = client.get_run(run_id)
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert (model.name, model.source_run_id) == ("pretrain", run_id) and str(model.status).endswith("READY")
    assert model.params["model.depth"] == "2" and model.params["train.steps"] == "4"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert [a.path for a in client.list_logged_model_artifacts(model.model_id)] == ["meta.json"]
    assert {m.key for m in model.metrics} == {"final_train_loss", "final_val_loss"}  # no bpb without a tokenizer
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["mlflow_model_id"] == model.model_id
    # System metrics of the training run (a run shorter than the sampling interval still gets one sample).
    assert "system/cpu_utilization_percentage" in run.data.metrics and "system/system_memory_usage_megabytes" in run.data.metrics

    # An eval of that checkpoint logs CORE and bpb against the model and the evaluation data's digest.
    cfg = load_config("tiny", [f"run.artifact_root={artifact_root}", f"run.mlflow_tracking_uri={uri}"])
    final = str(tmp_path / "train" / "final")
    core = {"core": 0.25, "label": "CORE-subset-1", "missing": [], "n_tasks": 1, "bundle": "/kit/core_eval",
            "bundle_fingerprint": "c0" * 32, "tasks": {"arc_easy": {"centered": 0.25, "accuracy": 0.4375}}}
    _log_mlflow(cfg, "pretrain", core, {"bpb": 2.5}, tmp_path, {
        "model": {"uri": final, "hash": "m0" * 10, "stage": "checkpoint", "counts": {}},
        "tokens": {"uri": str(shards), "hash": "70" * 10, "stage": "tokenize", "counts": {}}})
    metrics = {m.key: m for m in client.get_logged_model(model.model_id).metrics}
    assert (metrics["core"].value, metrics["core"].dataset_name, metrics["core"].dataset_digest) == (0.25, "core_eval", "c0" * 10)
    assert (metrics["bpb"].value, metrics["bpb"].dataset_name, metrics["bpb"].dataset_digest) == (2.5, "tokenize", "70" * 10)

    # The export stage registers the model: a version of kiln-tiny, lineage in its tags, alias "current".
    export = execute("export", cfg, {"model": final, "tokenizer": tok_uri}, progress=False)
    version = client.get_model_version_by_alias("kiln-tiny", "current")
    assert export.manifest["mlflow_registered"] == {"name": "kiln-tiny", "version": str(version.version),
                                                    "alias": "current", "model_id": model.model_id}
    assert version.source == f"models:/{model.model_id}" and version.run_id == run_id
    tok_manifest = json.loads((Path(tok_uri) / "manifest.json").read_text())
    assert version.tags["kiln.lineage.tokenizer"] == f"{tok_manifest['key']} {tok_manifest['hash']}"
    assert version.tags["kiln.export_uri"] == os.path.abspath(export.uri) and version.tags["kiln.preset"] == "tiny"
    links = json.loads(client.get_logged_model(model.model_id).tags["mlflow.modelVersions"])
    assert links == [{"name": "kiln-tiny", "version": version.version}]  # as mlflow.register_model writes it
    # Cached, or recomputed with the same key: the same version, not a new one.
    assert execute("export", cfg, {"model": final, "tokenizer": tok_uri}, progress=False).cached
    execute("export", cfg, {"model": final, "tokenizer": tok_uri}, force=True, progress=False)
    assert [v.version for v in client.search_model_versions("name = 'kiln-tiny'")] == [version.version]


# --------------------------------------------------------------------------- upload


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch):
    from hub_upload_server import HubUploadServer

    with HubUploadServer(token="hf_secret_test_token_123") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


def test_push_to_hub_uploads_the_export_with_hf_token_and_never_prints_it(tmp_path, checkpoint, tok_dir, hub,
                                                                         monkeypatch, capsys) -> None:
    out = tmp_path / "hf"
    argv = ["export", "--checkpoint", str(checkpoint), "--tokenizer", str(tok_dir), "--output", str(out),
            "--push-to-hub", "kiln-test/tiny-chat"]
    # No token: refused before anything is written.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, err = _kiln(argv, capsys)
    assert code == 1 and "set HF_TOKEN" in err and not out.exists() and not hub.paths

    monkeypatch.setenv("HF_TOKEN", hub.token)
    code, err = _kiln(argv, capsys)
    assert code == 0, err
    uploaded = hub.repos["kiln-test/tiny-chat"]
    assert uploaded == {p.name: p.read_bytes() for p in out.iterdir()}  # every file, byte for byte
    assert "model.safetensors" in uploaded and "README.md" in uploaded
    assert set(hub.auth) == {f"Bearer {hub.token}"}
    printed = capsys.readouterr()
    assert hub.token not in printed.out + printed.err + err


def test_push_to_hub_with_a_rejected_token_fails_without_printing_it(tmp_path, checkpoint, tok_dir, hub,
                                                                    monkeypatch, capsys) -> None:
    wrong = "hf_wrong_token_456"
    monkeypatch.setenv("HF_TOKEN", wrong)
    code, err = _kiln(["export", "--checkpoint", str(checkpoint), "--tokenizer", str(tok_dir), "--output",
                       str(tmp_path / "hf"), "--push-to-hub", "kiln-test/tiny-chat"], capsys)
    assert code == 1 and "--push-to-hub kiln-test/tiny-chat: upload failed" in err and "401" in err
    assert len(err.strip().splitlines()) == 1
    printed = capsys.readouterr()
    assert wrong not in err + printed.out + printed.err
    assert (tmp_path / "hf" / "config.json").is_file()  # the export itself is done and kept


# --------------------------------------------------------------------------- lm-evaluation-harness


@pytest.mark.parametrize("exported", ["mha", "swa"], indirect=True)
def test_lm_eval_scores_the_export_on_a_kit_task_as_kiln_would(exported, shared_data: Path, monkeypatch) -> None:
    """lm_eval's Python API runs the repo's task file (ARC-Easy from the kit's CORE bundle) on the export,
    offline, and its log-likelihood of every answer is the one Kiln's own model gives the same tokens."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    model, tok, _, _, out = exported
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(shared_data)  # the task reads core_eval/... relative to the data kit's root
    # max_length: what Kiln's rotary table covers (4 x seq_len), so neither side crops these prompts.
    remote = ",trust_remote_code=True" if (out / "modeling_kiln.py").exists() else ""
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},add_bos_token=True,dtype=float32,"
                                  f"max_length={4 * model.config.seq_len}{remote}", tasks=["kit_arc_easy"],
                                  task_manager=TaskManager(include_path=str(repo / "docs" / "lm_eval")),
                                  limit=6, device="cpu", batch_size=4, log_samples=True)
    assert res["results"]["kit_arc_easy"]["sample_len"] == 6
    samples = res["samples"]["kit_arc_easy"]
    checked = 0
    with torch.no_grad():
        for s in samples:
            context = s["doc"]["query"] + "\nAnswer:"
            for choice, (ll, _) in zip(s["doc"]["choices"], [r[0] for r in s["resps"]]):
                ctx = [tok.bos_id, *tok.encode(context)]
                whole = [tok.bos_id, *tok.encode(context + " " + choice)]
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0], dim=-1)
                ours = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
                assert ll == pytest.approx(ours, abs=1e-3), (context, choice)
                checked += 1
    assert checked == sum(len(s["doc"]["choices"]) for s in samples) >= 24
