"""The trainer end to end on CPU: loader packing, torchrun 1 vs 2 processes, kill -9 resume, signals, errors.

Every run uses the tiny fixture data from ``train_fixtures`` (a Markov chain over 64 tokens) and a
~100K-parameter model, one OpenMP thread per process (the CI box has 2 shared cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import FaultProxy, moto_server, s3_bucket  # noqa: E402,F401  (pytest fixtures)
from train_fixtures import BOS, tiny_job, write_token_shards  # noqa: E402

from llm.config import TrainConfig  # noqa: E402
from llm.train.loaders import PretrainLoader  # noqa: E402
from llm.stages.output import StageError  # noqa: E402
from llm.train.stages import launch_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return write_token_shards(tmp_path_factory.mktemp("tokens") / "tok")


def _weights(out: Path, sub: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(out / sub / "model.safetensors"))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run_job(job: dict, path: Path, **popen) -> subprocess.Popen:
    path.write_text(json.dumps(job))
    return subprocess.Popen([sys.executable, "-m", "llm.train.trainer", "--job", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **popen)


def _launch(job: dict, nproc: int = 1) -> dict:
    return launch_training(stage=job["stage"], model_config=job["model"], train_config=TrainConfig(**job["train"]),
                           loader_kind="pretrain", loader_spec=job["loader"]["spec"], out_dir=job["out_dir"],
                           seed=job["seed"], upload_uri=job.get("upload_uri"), progress=False, nproc=nproc,
                           on_line=lambda line: None)


# --------------------------------------------------------------------------- loader


def test_loader_rows_are_bos_aligned_full_and_split_across_ranks(tokens):
    kw = dict(batch_size=3, seq_len=32, seed=5)
    one = PretrainLoader({"uri": str(tokens)}, rank=0, world_size=1, **kw)
    ranks = [PretrainLoader({"uri": str(tokens)}, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(6):
        # 1 process, 2 micro-batches == 2 processes, 1 micro-batch each (same rows, same order)
        a1, b1 = one.next_batch()
        a2, b2 = one.next_batch()
        (r0x, r0y), (r1x, r1y) = ranks[0].next_batch(), ranks[1].next_batch()
        assert torch.equal(a1, r0x) and torch.equal(a2, r1x) and torch.equal(b2, r1y)
        for x, y in ((a1, b1), (a2, b2)):
            assert x.dtype == torch.int64 and x.shape == (3, 32)
            assert torch.all(x[:, 0] == BOS)  # every row starts at a document start
            assert torch.equal(x[:, 1:], y[:, :-1]) and torch.all(y >= 0)  # no padding, no ignored targets
    assert one.tokens_seen_by_source == {"pretrain": 12 * 3 * 32}


def test_loader_state_resumes_exactly_and_epochs_reshuffle(tokens):
    kw = dict(batch_size=4, seq_len=32, rank=0, world_size=1, seed=1)
    a = PretrainLoader({"uri": str(tokens)}, **kw)
    for _ in range(50):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    b = PretrainLoader({"uri": str(tokens)}, **kw)
    b.load_state_dict(state)
    for _ in range(200):  # crosses epoch boundaries (the fixture has ~24K train tokens)
        assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))
    assert a.epoch >= 2 and b.epoch == a.epoch
    # each epoch is a different seeded permutation; the same seed gives the same one
    perm = [a.packer.order(e) for e in range(3)]
    assert not np.array_equal(perm[0], perm[1]) and np.array_equal(perm[1], b.packer.order(1))
    # a state from other data is refused
    bad = dict(state, n_docs=state["n_docs"] + 1)
    with pytest.raises(ValueError, match="different data"):
        b.load_state_dict(bad)


def test_val_batches_are_deterministic_and_rank_disjoint(tokens):
    kw = dict(batch_size=2, seq_len=32, seed=0)
    r = [PretrainLoader({"uri": str(tokens)}, rank=i, world_size=2, **kw) for i in range(2)]
    v0 = list(r[0].val_batches(1024))
    assert len(v0) == len(list(r[1].val_batches(1024))) == 1024 // (2 * 2 * 32)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(v0, r[0].val_batches(1024)))
    assert not torch.equal(v0[0][0], next(iter(r[1].val_batches(1024)))[0])


# --------------------------------------------------------------------------- trainer


def test_indivisible_grad_accum_fails_before_training(tokens, tmp_path, monkeypatch):
    job = tiny_job(tokens, tmp_path / "out", total_batch_tokens=300)  # 300 % (4*32) != 0
    started: list[object] = []
    with monkeypatch.context() as m:  # any process launched would be recorded here (and not run)
        m.setattr(subprocess, "Popen", lambda *a, **kw: started.append(a))
        with pytest.raises(StageError, match=r"total_batch_tokens 300 is not a multiple of .* 128 tokens"):
            _launch(job)
    assert started == [] and not (tmp_path / "out" / "job.json").exists()  # refused before launching anything
    # the trainer itself refuses too (e.g. a hand-written job), before building anything
    proc = _run_job(job, tmp_path / "job.json")
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 2 and "batch plan error" in out
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_one_vs_two_processes_match(tokens, tmp_path):
    """Same total batch (256 tokens/step): 1 process × 2 accumulation steps vs 2 gloo processes × 1.

    Tolerance: 1e-5 absolute on every weight and on the logged losses. The two runs see the same rows
    per step and differ only in fp32 summation order (DDP all-reduce vs local accumulation); in practice
    they agree bit for bit on this machine.
    """
    s1 = _launch(tiny_job(tokens, tmp_path / "one", steps=8, eval_every=4), nproc=1)
    s2 = _launch(tiny_job(tokens, tmp_path / "two", steps=8, eval_every=4), nproc=2)
    assert s1["world_size"] == 1 and s2["world_size"] == 2 and s1["tokens"] == s2["tokens"] == 8 * 256
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5
    l1 = [m["loss"] for m in _metrics(tmp_path / "one") if "loss" in m]
    l2 = [m["loss"] for m in _metrics(tmp_path / "two") if "loss" in m]
    assert len(l1) == len(l2) > 2 and np.allclose(l1, l2, atol=1e-5, rtol=0)
    assert s1["final_val_loss"] == pytest.approx(s2["final_val_loss"], abs=1e-5)
    assert s2["tokens_by_source"] == {"pretrain": 8 * 256}


def test_kill9_then_resume_is_bit_identical(tokens, tmp_path):
    steps = 40
    ref = tiny_job(tokens, tmp_path / "ref", steps=steps, ckpt_every=8, eval_every=20)
    _launch(ref)

    job = tiny_job(tokens, tmp_path / "run", steps=steps, ckpt_every=8, eval_every=20)
    job["step_sleep_s"] = 0.15  # slow enough to be killed mid-run
    proc = _run_job(job, tmp_path / "job.json")
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "step_000016" / "meta.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "final").exists()
    killed_at = max(m["step"] for m in _metrics(tmp_path / "run"))
    assert killed_at < steps

    job["step_sleep_s"] = 0.0
    summary = _launch(job)  # resume="auto" picks up the newest checkpoint in out_dir
    assert summary["steps"] == steps
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    ra, rb = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    assert [m["step"] for m in ra] == [m["step"] for m in rb]  # rows after the checkpoint were replaced
    assert [m.get("loss") for m in ra] == [m.get("loss") for m in rb]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["start_step"] >= 16 and plan["resumed_from"]


def test_sigterm_checkpoints_and_exits_cleanly(tokens, tmp_path):
    job = tiny_job(tokens, tmp_path / "run", steps=200, ckpt_every=1000, eval_every=1000)
    job["step_sleep_s"] = 0.1
    proc = _run_job(job, tmp_path / "job.json")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, out
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and 0 < status["step"] < 200
    assert (tmp_path / "run" / "checkpoints" / f"step_{status['step']:06d}" / "meta.json").exists()
    assert "checkpoint (signal)" in out


def test_resume_with_a_different_model_is_refused(tokens, tmp_path):
    from llm.checkpoint import CheckpointError
    from llm.train.trainer import Trainer

    job = tiny_job(tokens, tmp_path / "run", steps=4, ckpt_every=4, eval_every=0)
    _launch(job)
    job["model"]["depth"] = 3
    with pytest.raises(CheckpointError, match=r"does not match the model config \(depth: checkpoint 2 vs config 3\)"):
        Trainer(job)


def test_checkpoints_mirror_to_s3_and_resume_from_there(tokens, tmp_path, s3_bucket):
    """A lost machine: killed while mirroring a checkpoint, the run resumes from the newest complete copy on S3."""
    from llm.checkpoint import load_model
    from llm.storage import Store

    up = f"{s3_bucket.uri}/pretrain/abc.partial"
    ref = tiny_job(tokens, tmp_path / "ref", steps=16, ckpt_every=4, eval_every=0, keep_last=2)
    _launch(ref)

    job = tiny_job(tokens, tmp_path / "a", steps=16, ckpt_every=4, eval_every=0, keep_last=2)
    job["upload_uri"] = up
    store = Store(up)
    with FaultProxy(s3_bucket.endpoint) as proxy:
        # The trainer mirrors each checkpoint before it trains on, meta.json last (it marks the copy
        # complete). Holding step 12's meta.json stops the run exactly there, however fast or slow the
        # machine: steps 4 and 8 mirrored, step 12's other files up, and then the machine dies.
        held = proxy.add_hang("PUT", "*/checkpoints/step_000012/meta.json")
        proc = _run_job(job, tmp_path / "job.json", env={**os.environ, "AWS_ENDPOINT_URL": proxy.url})
        deadline = time.time() + 240
        while not held.arrived.wait(0.1):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "step 12's checkpoint was never mirrored"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    complete = {u.split("/")[-2] for u in store.list(f"{up}/checkpoints") if u.endswith("/meta.json")}
    assert complete == {"step_000004", "step_000008"}, complete
    assert store.exists(f"{up}/checkpoints/step_000012/model.safetensors")  # a partial copy, to be ignored

    job2 = dict(job, out_dir=str(tmp_path / "b"))  # a fresh machine: nothing local
    _launch(job2)
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan["start_step"] == 8 and "step_000008" in plan["resumed_from"]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the mirror was pruned to keep_last=2 and the final checkpoint is loadable straight from S3
    assert {u.split("/")[-2] for u in store.list(f"{up}/checkpoints")} == {"step_000012", "step_000016"}
    assert store.exists(f"{up}/final/model.safetensors")
    model, meta = load_model(up)
    assert meta["step"] == 16


def test_a_failing_job_reports_its_exit_code_and_last_lines(tokens, tmp_path):
    from llm.train.stages import TrainingFailed

    job = tiny_job(tmp_path / "no-such-tokens", tmp_path / "out")
    seen: list[str] = []
    with pytest.raises(TrainingFailed) as err:
        launch_training(stage="pretrain", model_config=job["model"], train_config=TrainConfig(**job["train"]),
                        loader_kind="pretrain", loader_spec=job["loader"]["spec"], out_dir=job["out_dir"],
                        progress=False, nproc=1, on_line=seen.append)
    assert err.value.code != 0 and "no-such-tokens" in str(err.value)  # the trainer's own error, in the tail
    assert "exited with code" in str(err.value) and seen and seen[-1] in err.value.tail


def test_output_pump_separates_lines_from_progress_redraws():
    from llm.torchrun import _pump

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.write('a\\n 10%\\r 20%\\rb\\nc')"],
                            stdout=subprocess.PIPE)
    got: list[tuple[str, bool]] = []
    _pump(proc, lambda text, bar: got.append((text, bar)))
    proc.wait()
    assert got == [("a", False), (" 10%", True), (" 20%", True), ("b", False), ("c", False)]


def test_torch_compile_trains_like_eager_and_saves_plain_weights(tokens, tmp_path):
    """The compiled path (inductor on CPU here; on GPU the same call) gives eager's losses, and its
    checkpoints load into an uncompiled model: no ``_orig_mod.`` prefixes leak into the weights."""
    eager = _launch(tiny_job(tokens, tmp_path / "eager", steps=6, eval_every=0))
    compiled = _launch(tiny_job(tokens, tmp_path / "compiled", steps=6, eval_every=0, compile=True))
    assert json.loads((tmp_path / "compiled" / "plan.json").read_text())["compiled"] is True
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], abs=1e-4)
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_bfloat16_autocast_path_trains(tokens, tmp_path):
    """dtype=bfloat16 runs the autocast path (on CPU here; on CUDA it is the default): the plan says
    so, loss falls, and it stays near fp32 without being bit-equal (the casts really happened)."""
    fp32 = _launch(tiny_job(tokens, tmp_path / "fp32", steps=12, eval_every=0))
    bf16 = _launch(tiny_job(tokens, tmp_path / "bf16", steps=12, eval_every=0, dtype="bfloat16"))
    assert json.loads((tmp_path / "bf16" / "plan.json").read_text())["autocast"] == "bfloat16"
    assert json.loads((tmp_path / "fp32" / "plan.json").read_text())["autocast"] == "off (fp32)"
    first = [m["loss"] for m in _metrics(tmp_path / "bf16") if "loss" in m]
    assert first[-1] < first[0]
    assert bf16["final_train_loss"] == pytest.approx(fp32["final_train_loss"], abs=0.05)
    assert bf16["final_train_loss"] != fp32["final_train_loss"]
    # master weights stay fp32 under autocast
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "bf16").values())


# ---------------------------------------------------------------- optimizer options (llm.train.optim)
def test_polar_express_is_closer_to_orthogonal_than_newton_schulz():
    from llm.train.optim import newton_schulz, polar_express

    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64)]:
        G = torch.randn(*shape)
        pe, ns = torch.linalg.svdvals(polar_express(G)), torch.linalg.svdvals(newton_schulz(G))
        assert 0.8 < pe.min() and pe.max() < 1.2, pe
        assert (pe - 1).abs().max() < (ns - 1).abs().max()  # NS leaves singular values down near 0.7
        X = polar_express(G)
        small = X @ X.mT if shape[0] < shape[1] else X.mT @ X
        assert torch.allclose(small, torch.eye(64), atol=0.3)


def test_cautious_weight_decay_only_decays_where_update_and_weight_agree():
    from llm.train.optim import apply_weight_decay

    p = torch.tensor([1.0, 1.0, -1.0, -1.0])
    update = torch.tensor([0.5, -0.5, -0.5, 0.5])  # the step is p -= lr·update
    q = p.clone()
    apply_weight_decay(q, update, lr=0.1, wd=0.5, cautious=True)
    assert q.tolist() == pytest.approx([0.95, 1.0, -0.95, -1.0])
    q = p.clone()
    apply_weight_decay(q, update, lr=0.1, wd=0.5, cautious=False)
    assert q.tolist() == pytest.approx([0.95, 0.95, -0.95, -0.95])


def test_normuon_evens_out_row_scales_and_keeps_the_step_size():
    from llm.train.optim import normuon_rescale

    torch.manual_seed(0)
    u = torch.randn(32, 8) * torch.linspace(0.1, 3.0, 32)[:, None]  # tall: rows of very different scale
    sm = torch.zeros(32, 1)
    out = normuon_rescale(u, sm, beta2=0.0)  # beta2 0: the state is this update's row mean square
    rows = out.norm(dim=1)
    assert torch.allclose(rows, rows.mean().expand(32), rtol=1e-4)
    assert out.norm() == pytest.approx(u.norm().item(), rel=1e-5)
    assert torch.allclose(sm, u.square().mean(dim=1, keepdim=True))
    wide = normuon_rescale(u.mT.contiguous(), torch.zeros(1, 32), beta2=0.0)  # wide: per column (smaller side)
    assert torch.allclose(wide.norm(dim=0), rows.mean().expand(32), rtol=1e-4)


def test_momentum_and_weight_decay_schedules():
    from llm.train.optim import muon_momentum_at, weight_decay_at

    kw = dict(peak=0.97, warmup_steps=100, warmdown_frac=0.5)
    assert muon_momentum_at(0, 400, **kw) == pytest.approx(0.85)
    assert muon_momentum_at(50, 400, **kw) == pytest.approx(0.91)
    assert muon_momentum_at(150, 400, **kw) == pytest.approx(0.97)
    assert muon_momentum_at(300, 400, **kw) == pytest.approx(0.935)  # halfway down the warmdown
    assert muon_momentum_at(400, 400, **kw) == pytest.approx(0.90)
    assert weight_decay_at(7, 100, base=0.2, schedule="constant") == 0.2
    assert weight_decay_at(0, 100, base=0.2, schedule="cosine") == pytest.approx(0.2)
    assert weight_decay_at(50, 100, base=0.2, schedule="cosine") == pytest.approx(0.1)
    assert weight_decay_at(100, 100, base=0.2, schedule="cosine") == pytest.approx(0.0)


def test_set_step_moves_muon_momentum_and_weight_decay():
    from llm.model import GPT, GPTConfig
    from llm.train.optim import Muon, build_optimizers

    m = GPT(GPTConfig(vocab_size=32, depth=1, aspect_ratio=32, head_dim=16, seq_len=8))
    tc = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.1, muon_momentum=0.95, muon_momentum_schedule=True,
                     muon_momentum_warmup=10, wd_schedule="cosine", warmdown_frac=0.5)
    opt = build_optimizers(m, tc)
    muon = next(o for o in opt.opts if isinstance(o, Muon))
    opt.set_step(0, 20)
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.85)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.1)
    opt.set_step(10, 20)
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.95)  # warmed up to muon_momentum; the warmdown starts here
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.05)
    plain = build_optimizers(m, TrainConfig(optimizer="muon", lr=0.02, muon_momentum=0.95, muon_momentum_schedule=False,
                                            wd_schedule="constant"))
    plain.set_step(0, 20)  # no schedules: the configured momentum stays
    assert next(o for o in plain.opts if isinstance(o, Muon)).param_groups[0]["momentum"] == 0.95


SWITCHES = {
    "value_embeds": ({"value_embeds": True}, {}),
    "smear": ({"smear": True}, {}),
    "backout": ({"backout": True}, {}),
    "polar_express": ({}, {"muon_orthogonalizer": "polar_express"}),
    "normuon": ({}, {"muon_normuon": True}),
    "cautious_wd": ({}, {"cautious_wd": True, "weight_decay": 0.2, "wd_schedule": "cosine"}),
    "momentum_schedule": ({}, {"muon_momentum_schedule": True, "muon_momentum_warmup": 10}),
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_short_training_run_with_each_switch_decreases_the_loss(name):
    from llm.model import GPT, GPTConfig
    from llm.train.optim import build_optimizers

    model_kw, train_kw = SWITCHES[name]
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, depth=2, aspect_ratio=32, head_dim=16, seq_len=32, **model_kw))
    rng = np.random.default_rng(0)
    succ = rng.integers(1, 64, size=64)  # a deterministic next-token rule the model can learn
    opt = build_optimizers(m, TrainConfig(optimizer="muon", lr=0.02, embedding_lr=0.05, unembedding_lr=0.01, **train_kw))
    losses = []
    for step in range(40):
        x = torch.from_numpy(rng.integers(1, 64, size=(4, 32)))
        x[:, 1::2] = torch.from_numpy(succ)[x[:, 0::2]]
        y = torch.roll(x, -1, dims=1)
        y[:, -1] = -1
        opt.set_step(step, 40)
        loss = m(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < losses[0] - 0.5, (name, losses[0], losses[-5:])


def test_trainer_runs_every_recipe_option_and_saves_a_loadable_model(tokens, tmp_path):
    from llm.checkpoint import load_model

    job = tiny_job(tokens, tmp_path / "run", steps=12, optimizer="muon", lr=0.02, embedding_lr=0.05,
                   unembedding_lr=0.01, muon_orthogonalizer="polar_express", muon_normuon=True, cautious_wd=True,
                   weight_decay=0.2, wd_schedule="cosine", muon_momentum_schedule=True, muon_momentum_warmup=4)
    job["model"].update(value_embeds=True, smear=True, backout=True)
    _launch(job)
    losses = [m["loss"] for m in _metrics(tmp_path / "run") if "loss" in m]
    assert losses[-1] < losses[0] - 0.3, losses
    model, _ = load_model(str(tmp_path / "run"))
    assert model.config.value_embeds and model.config.smear and model.config.backout
    assert len(model.value_embeds) == 1 and float(model.backout_lambda.detach()) != 0.2  # trained, not the init


def test_pretraining_defaults_to_muon_and_fine_tuning_keeps_adamw():
    from llm.config import KilnConfig, MidtrainConfig, SFTConfig
    from llm.model import GPT, GPTConfig
    from llm.train.optim import Muon, build_optimizers

    m = GPT(GPTConfig(vocab_size=32, depth=1, aspect_ratio=192, head_dim=16, seq_len=8))  # model_dim 192
    opt = build_optimizers(m, KilnConfig().pretrain)
    lrs = {g["name"]: g["lr"] for o in opt.opts for g in o.param_groups}
    muon = next(o for o in opt.opts if isinstance(o, Muon))
    adam = next(o for o in opt.opts if not isinstance(o, Muon))
    # The measured recipe (bench/results_quality.md): Adam LRs ×√(768/192) = ×2, β₁ 0.8, Muon variants on.
    assert lrs == pytest.approx({"matrices": 0.02, "embedding": 0.4, "lm_head": 0.008})
    assert adam.defaults["betas"] == (0.8, 0.95) and all(g["weight_decay"] == 0.0 for g in adam.param_groups)
    g = muon.param_groups[0]
    assert (g["orthogonalizer"], g["normuon"], g["cautious_wd"], g["weight_decay"]) == ("polar_express", True, True, 0.28)
    for cfg in (MidtrainConfig(), SFTConfig(), KilnConfig().midtrain, KilnConfig().sft):
        opts = build_optimizers(m, cfg).opts
        assert not any(isinstance(o, Muon) for o in opts)
        # AdamW runs keep their recipe: one LR, β₁ 0.9, no weight decay.
        assert opts[0].defaults["betas"] == (0.9, 0.95)
        assert {gr["lr"] for gr in opts[0].param_groups} == {cfg.lr}
        assert all(gr["weight_decay"] == 0.0 for gr in opts[0].param_groups)
