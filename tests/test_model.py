"""The GPT model: exact accounting, KV-cached generation, learning, checkpoint loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from llm.checkpoint import CheckpointError, load_model, save_checkpoint
from llm.model import GPT, GPTConfig
from llm.train.optim import lr_multiplier


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_param_and_flop_counts_match_hand_calculation():
    # depth 3, dim 96 (aspect 32), head_dim 16 -> 6 heads, GQA with 2 kv heads, vocab 100, T 64
    cfg = GPTConfig(vocab_size=100, depth=3, aspect_ratio=32, head_dim=16, n_kv_heads=2, seq_len=64)
    m = GPT(cfg)
    V, D, L, H, K, hd, T = 100, 96, 3, 6, 2, 16, 64
    per_layer = D * H * hd + 2 * D * K * hd + H * hd * D + 4 * D * D + 4 * D * D
    #         = 9216     + 6144          + 9216       + 36864   + 36864 = 98304
    assert per_layer == 98304
    hand_params = 2 * V * D + L * per_layer  # 19200 + 294912
    assert m.num_params() == hand_params == 314112
    hand_flops = 6 * (hand_params - V * D) + 12 * L * H * hd * T
    assert m.flops_per_token() == hand_flops == 6 * 304512 + 221184
    # nothing hides outside the count: no biases, no norm weights
    assert not any("bias" in n for n, _ in m.named_parameters())
    assert all(p.ndim == 2 for p in m.parameters())


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not divisible by head_dim"):
        GPTConfig(vocab_size=10, depth=3, aspect_ratio=64, head_dim=128)
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPTConfig(vocab_size=10, depth=2, aspect_ratio=64, head_dim=32, n_kv_heads=3)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_kv_cache_generation_matches_full_forward(kv_heads):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, depth=2, aspect_ratio=32, head_dim=16, n_kv_heads=kv_heads, seq_len=32)
    m = GPT(cfg)
    with torch.no_grad():  # random residual projections so the check is not trivially about zeros
        for p in m.parameters():
            p.normal_(0, 0.2)
    m.eval()
    prompt = [1, 7, 3, 9, 4]
    got = list(m.generate(prompt, 10, temperature=0.0))
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]
    # sampling is reproducible with a seed and top_k=1 is greedy
    a = list(m.generate(prompt, 8, temperature=1.0, top_k=5, seed=3))
    b = list(m.generate(prompt, 8, temperature=1.0, top_k=5, seed=3))
    assert a == b and len(a) == 8
    assert list(m.generate(prompt, 6, temperature=1.0, top_k=1, seed=1)) == got[:6]


def test_loss_reduction_and_ignore_index():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=20, depth=1, aspect_ratio=32, head_dim=16, seq_len=8))
    x = torch.randint(0, 20, (2, 8))
    y = x.clone()
    y[:, :4] = -1
    per = m(x, y, reduction="none")
    assert per.shape == (2, 8) and torch.all(per[:, :4] == 0)
    assert torch.allclose(m(x, y), per[:, 4:].mean())
    assert m(x, torch.full_like(y, -1)).item() == 0.0  # fully masked: 0, not NaN


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_overfit_one_batch(optimizer):
    from llm.config import TrainConfig
    from llm.train.optim import build_optimizers

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, depth=2, aspect_ratio=32, head_dim=16, seq_len=32))
    x = torch.randint(1, 64, (4, 32))
    y = torch.roll(x, -1, dims=1)
    lr = 3e-3 if optimizer == "adamw" else 0.02
    opt = build_optimizers(m, TrainConfig(optimizer=optimizer, lr=lr, embedding_lr=0.05 if optimizer == "muon" else None,
                                          unembedding_lr=0.01 if optimizer == "muon" else None))
    first = None
    for _ in range(100):
        loss = m(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert first > 3.5  # ~ln(64) at init
    assert loss.item() < 0.1, f"{optimizer} failed to memorise one batch: {first:.3f} -> {loss.item():.3f}"


def test_lr_schedules():
    kw = dict(warmup_steps=10, warmdown_frac=0.2, min_lr_frac=0.1)
    assert lr_multiplier(0, 100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, schedule="linear", **kw) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, schedule="linear", **kw) == 1.0
    assert lr_multiplier(99, 100, schedule="linear", **kw) == pytest.approx(0.1)
    # warmdown covers steps 80..99; step 90 is 11/20 of the way (the final step lands exactly on min)
    assert lr_multiplier(90, 100, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * (1 - 0.55))
    assert lr_multiplier(90, 100, schedule="wsd", **kw) == pytest.approx(0.1 + 0.9 * (1 - 0.55 ** 0.5))
    c = [lr_multiplier(s, 100, schedule="cosine", **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(c, c[1:])) and c[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, schedule="nope")


def _save_tiny(path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, depth=1, aspect_ratio=32, head_dim=16, seq_len=8)
    m = GPT(cfg)
    save_checkpoint(path, model_state=m.state_dict(), meta={"step": 3, "model_config": cfg.to_dict()})
    return m


def test_checkpoint_roundtrip_and_corruption_errors(tmp_path):
    m = _save_tiny(tmp_path / "ck")
    loaded, meta = load_model(str(tmp_path / "ck"))
    assert meta["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
    # a stage output dir with final/ resolves too
    _save_tiny(tmp_path / "stage" / "final")
    assert load_model(str(tmp_path / "stage"))[1]["step"] == 3

    # bit flip -> named file and "SHA-256"
    p = tmp_path / "ck" / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 mismatch"):
        load_model(str(tmp_path / "ck"))
    # truncation -> size mismatch
    p.write_bytes(bytes(raw[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(str(tmp_path / "ck"))
    # no meta (interrupted save) and nothing at all
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_model(str(tmp_path / "nothing"))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    _save_tiny(tmp_path / "ck")
    meta_path = tmp_path / "ck" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["depth"] = 2  # claims two layers, weights have one
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.1"):
        load_model(str(tmp_path / "ck"))


# --------------------------------------------------------------------------- sliding-window attention


def _windowed(pattern: str = "SSSL", seed: int = 0, kv_heads: int | None = None) -> GPT:
    """A 4-layer model at seq_len 512 (short window 128), random weights at a scale where every block
    matters (the init's zero residual projections would make attention invisible)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=64, depth=4, aspect_ratio=16, head_dim=16, n_kv_heads=kv_heads, seq_len=512,
                      window_pattern=pattern))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    return m.eval()


def test_window_pattern_follows_nanochats_convention():
    cfg = GPTConfig(vocab_size=10, depth=6, aspect_ratio=32, head_dim=16, seq_len=512, window_pattern="SSL")
    assert cfg.short_window == 128  # a quarter of 512, already a multiple of 128
    assert cfg.layer_windows() == [128, 128, None, 128, 128, None]
    assert GPTConfig(vocab_size=10, depth=3, aspect_ratio=32, head_dim=16, seq_len=2048,
                     window_pattern="S").layer_windows() == [512, 512, None]  # the last layer is always full
    assert GPTConfig(vocab_size=10, depth=1, aspect_ratio=32, head_dim=16, seq_len=100).short_window == 128
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(vocab_size=10, depth=2, aspect_ratio=32, head_dim=16, window_pattern="SXL")
    # An old checkpoint's meta has no window_pattern: every layer full, as before the option existed.
    old = GPTConfig.from_dict({"vocab_size": 10, "depth": 2, "aspect_ratio": 32, "head_dim": 16, "n_kv_heads": None,
                               "seq_len": 64, "softcap": 15.0, "rope_base": 10000.0})
    assert old.window_pattern == "L" and old.layer_windows() == [None, None]
    # Training FLOPs count a short layer's attention over its window only.
    full, win = _windowed("L"), _windowed("SSSL")
    assert full.flops_per_token() - win.flops_per_token() == 12 * 4 * 16 * 3 * (512 - 128)


def test_windowed_attention_equals_manual_masked_softmax():
    m = _windowed()
    attn = m.blocks[0].attn
    assert attn.window == 128
    T = 300
    x = torch.randn(1, T, 64)
    cos, sin = m.rope_cos[:T], m.rope_sin[:T]
    with torch.no_grad():
        got = attn(x, cos, sin, None)
        q = attn.c_q(x).view(1, T, 4, 16).transpose(1, 2)
        k = attn.c_k(x).view(1, T, 4, 16).transpose(1, 2)
        v = attn.c_v(x).view(1, T, 4, 16).transpose(1, 2)
        from llm.model import apply_rotary, rms_norm
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        i, j = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
        allowed = (j <= i) & (i - j <= 128)  # itself and the 128 tokens before it
        scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~allowed, float("-inf"))
        want = attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, T, 64))
        assert (got - want).abs().max().item() < 1e-5
        # A token outside a query's window does not reach it; one inside does.
        x2 = x.clone()
        x2[0, 10] += 5.0
        moved = (attn(x2, cos, sin, None) - got).abs().amax(dim=-1)[0]
    assert moved[10:139].min().item() > 1e-4      # positions 10..138 see position 10
    assert moved[139:].max().item() == 0.0        # position 139 on: 129 or more back, out of the window


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_windowed_kv_cache_equals_full_forward(kv_heads):
    from llm.model import KVCache

    m = _windowed(kv_heads=kv_heads)
    full_l = _windowed("L", kv_heads=kv_heads)
    ids = torch.randint(0, 64, (1, 320), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        assert (full - full_l(ids)).abs().max().item() > 1e-2  # the windows change the model
        # Prefill, a chunk after the prefix, then one token at a time: all three cache paths.
        cache = KVCache(4, 1, m.config.kv_heads, 320, 16, torch.device("cpu"), torch.float32)
        parts = [m(ids[:, :150], kv_cache=cache), m(ids[:, 150:300], kv_cache=cache)]
        parts += [m(ids[:, t:t + 1], kv_cache=cache) for t in range(300, 320)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-4
    prompt = ids[0, :200].tolist()
    got = list(m.generate(prompt, 12, temperature=0.0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]

# ---------------------------------------------------------------- nanochat HEAD recipe options
ALL_OPTIONS = dict(value_embeds=True, smear=True, backout=True)


def test_option_param_and_flop_counts_match_hand_calculation():
    # the same shape as above; value embeddings on layers 0 and 2 (alternate, always the last of 3)
    cfg = GPTConfig(vocab_size=100, depth=3, aspect_ratio=32, head_dim=16, n_kv_heads=2, seq_len=64, **ALL_OPTIONS)
    m = GPT(cfg)
    V, D, L, H, K, hd, T = 100, 96, 3, 6, 2, 16, 64
    assert [i for i in range(L) if cfg.has_value_embed(i)] == [0, 2]
    ve = 2 * (V * K * hd + 12 * K)  # two tables + their (K × 12) gates
    hand = 314112 + ve + (24 + 1) + 1  # + smear gate and λ + backout λ
    assert m.num_params() == hand == 320586
    matmul = hand - V * D - 2 * V * K * hd - 2  # lookups (wte, value embeddings) and the two λ excluded
    assert m.flops_per_token() == 6 * matmul + 12 * L * H * hd * T
    assert GPT(GPTConfig(vocab_size=100, depth=3, aspect_ratio=32, head_dim=16, value_embeds=True)).num_params() \
        == 2 * V * D + L * (4 * D * D + 8 * D * D) + 2 * (V * D + 12 * H)  # MHA: kv_dim = D, 6 kv heads


def test_param_groups_cover_every_parameter_once_in_its_role():
    m = GPT(GPTConfig(vocab_size=50, depth=2, aspect_ratio=32, head_dim=16, **ALL_OPTIONS))
    groups = m.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # every one, exactly once
    assert {id(e.weight) for e in m.value_embeds.values()} == {id(p) for p in groups["value_embeds"]}
    assert {id(p) for p in groups["scalars"]} == {id(m.smear_gate.weight), id(m.smear_lambda), id(m.backout_lambda)}
    assert id(m.blocks[1].attn.ve_gate.weight) in {id(p) for p in groups["matrices"]}  # 2-D: Muon's
    assert all(p.ndim == 2 for p in groups["matrices"])
    plain = GPT(GPTConfig(vocab_size=50, depth=2, aspect_ratio=32, head_dim=16)).param_groups()
    assert plain["value_embeds"] == [] and plain["scalars"] == []


def _randomised(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():  # non-zero residual projections and λs, so every path carries signal
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def test_each_option_changes_the_model_as_intended():
    base = dict(vocab_size=40, depth=2, aspect_ratio=32, head_dim=16, seq_len=16)
    x = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:12].unsqueeze(0)  # distinct tokens
    x2 = x.clone()
    x2[0, 5] = (x[0, 5] + 1) % 40
    # smear: with every block muted, position 6 sees token 5 only through the smear
    for smear in (False, True):
        m = _randomised(GPTConfig(**base, smear=smear))
        with torch.no_grad():
            for b in m.blocks:
                b.attn.c_proj.weight.zero_()
                b.mlp.c_proj.weight.zero_()
        changed = not torch.allclose(m(x)[0, 6], m(x2)[0, 6])
        assert changed == smear
    # backout with λ = 0 is the plain model; with λ ≠ 0 it is not
    m = _randomised(GPTConfig(**base, backout=True))
    plain = GPT(GPTConfig(**base)).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "backout_lambda"})
    assert not torch.allclose(m(x), plain(x))
    with torch.no_grad():
        m.backout_lambda.zero_()
    assert torch.allclose(m(x), plain(x), atol=1e-6)
    # value embeddings: the logits depend on the value-embedding table of the tokens read
    m = _randomised(GPTConfig(**base, value_embeds=True))
    before = m(x)
    with torch.no_grad():
        m.value_embeds["1"].weight[x[0, 3]] += 1.0
    assert not torch.allclose(before[0, 3:], m(x)[0, 3:]) and torch.allclose(before[0, :3], m(x)[0, :3])


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_kv_cache_generation_matches_full_forward_with_options(kv_heads):
    m = _randomised(GPTConfig(vocab_size=50, depth=3, aspect_ratio=32, head_dim=16, n_kv_heads=kv_heads,
                              seq_len=32, **ALL_OPTIONS))
    prompt = [1, 7, 3, 9, 4]
    got = list(m.generate(prompt, 10, temperature=0.0))
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_checkpoint_without_the_options_loads_and_unknown_options_are_refused(tmp_path):
    m = _save_tiny(tmp_path / "ck")
    meta_path = tmp_path / "ck" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for k in ALL_OPTIONS:  # a checkpoint written before the options existed has none of them
        meta["model_config"].pop(k, None)
    meta_path.write_text(json.dumps(meta))
    from llm.checkpoint import check_model_config

    check_model_config(meta, m.config.to_dict(), "old")  # resume / midtrain from it: the configs agree
    with pytest.raises(CheckpointError, match="smear: checkpoint None vs config True"):
        check_model_config(meta, GPTConfig(**{**m.config.to_dict(), "smear": True}).to_dict(), "old")
    loaded, _ = load_model(str(tmp_path / "ck"))
    assert not (loaded.config.value_embeds or loaded.config.smear or loaded.config.backout)
    x = torch.randint(0, 30, (1, 8))
    assert torch.equal(m.eval()(x), loaded(x))
    meta["model_config"]["sliding_windows"] = "SSSL"  # an option this code does not know
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"unknown fields \['sliding_windows'\]"):
        load_model(str(tmp_path / "ck"))


def test_options_that_are_off_leave_the_saved_model_config_as_it_was():
    base = dict(vocab_size=30, depth=1, aspect_ratio=32, head_dim=16, seq_len=8)
    plain = GPTConfig(**base).to_dict()
    assert not set(ALL_OPTIONS) & set(plain)  # the same dict a checkpoint from before the options holds
    on = GPTConfig(**base, smear=True).to_dict()
    assert on["smear"] is True and "value_embeds" not in on
    assert GPTConfig.from_dict(on) == GPTConfig(**base, smear=True) and GPTConfig.from_dict(plain) == GPTConfig(**base)
