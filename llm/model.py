"""A modern decoder-only GPT, sized by one number: depth.

Shape (all derived from :class:`GPTConfig`):

* ``model_dim = aspect_ratio * depth`` (64·depth in nanochat's series), ``n_heads = model_dim // head_dim``,
  ``n_kv_heads`` ≤ ``n_heads`` (fewer = grouped-query attention).
* token embedding → parameter-free RMSNorm → ``depth`` pre-norm blocks → RMSNorm → untied ``lm_head``.
* each block: ``x += attn(norm(x))``; ``x += mlp(norm(x))``. Attention uses rotary position embeddings,
  QK-norm (parameter-free RMSNorm on queries and keys after rotary) and ``F.scaled_dot_product_attention``
  (the flash kernel on GPU); optionally some layers attend over a sliding window only (``window_pattern``,
  an SDPA boolean mask). The MLP is ``proj(relu(fc(x))²)`` with a 4× hidden size.
* no biases anywhere; logits are soft-capped: ``softcap · tanh(logits / softcap)`` in fp32.

Optional pieces of nanochat HEAD's newer recipe, each off by default so older checkpoints load unchanged
(ablation: bench/results_quality.md):

* ``value_embeds``: a second token embedding per layer (alternate layers, the last one always) added to
  that layer's attention values through a per-head gate ``3·σ(W·x[:12])`` (ResFormer-style value
  residual): token identity reaches deep layers' values without passing through the residual stream.
* ``smear``: each position adds ``λ·σ(w·x[:24])`` times the previous token's normalised embedding
  (``λ`` starts at 0): cheap bigram information before the first layer.
* ``backout``: before the final norm, subtract ``λ`` (starts at 0.2) times the residual stream after
  layer ``depth // 2``, removing low-level features the logits do not need.

Why these choices: they are the nanochat/modded-nanoGPT recipe that trains stably at high learning rates
(QK-norm, soft-cap), keeps the parameter count exact and simple (no norm weights, no biases), and makes
MFU accounting honest (every parameter is a matmul weight except the embedding).

Accounting (exact, checked by tests against a hand calculation):

* ``num_params() = 2·V·D + depth·(D·H·hd + 2·D·K·hd + H·hd·D + 8·D²) + E·(V·K·hd + 12·K) + 25·smear
  + backout`` with V vocab, D model_dim, H query heads, K kv heads, hd head_dim, E the layers with value
  embeddings (wte + lm_head, then q,k,v,o and the 4× MLP, then each value embedding table and its gate, the
  smear gate (24) and λ, the backout λ).
* ``flops_per_token() = 6·M + 12·depth·H·hd·T`` with ``M = N − V·D − E·V·K·hd − smear − backout`` the matmul
  weights: 6 FLOPs per matmul weight per token (forward 2 + backward 4); embedding lookups (wte and the
  value embeddings) are gathers and the λ scalars are elementwise, so they are excluded; plus the attention score/value matmuls
  (QKᵀ and AV: 2·2·H·hd·T forward per layer per token, ×3 for forward+backward). T is ``seq_len``, or a
  sliding-window layer's window when shorter; causal masking is NOT halved, following the PaLM/nanochat convention so MFU numbers are comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# The gates read only the first few channels of their input: a cheap, input-dependent scalar per head/token.
VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24

# Architecture options added after the original shape, with the value that means "off" (the original
# architecture); to_dict leaves them out at that value.
OPTIONAL_FIELDS = {"window_pattern": "L", "value_embeds": False, "smear": False, "backout": False}

# SDPA grew native GQA support (``enable_gqa``) in torch 2.5; older versions repeat K/V heads.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass
class GPTConfig:
    """Everything that determines the network's shape. JSON-able (``to_dict``/``from_dict``)."""

    vocab_size: int
    depth: int = 12
    aspect_ratio: int = 64
    head_dim: int = 128
    n_kv_heads: int | None = None
    seq_len: int = 2048
    softcap: float = 15.0
    rope_base: float = 10000.0
    # Sliding-window attention, nanochat's convention: S (short window) and L (full context) tiled over the
    # layers, the last layer always L. Short windows cut attention cost on long contexts while the L layers
    # keep long-range reach. "L" (every layer full) is the architecture before this option existed.
    window_pattern: str = "L"
    # nanochat HEAD's newer recipe pieces (see the module docstring); False = the original architecture.
    value_embeds: bool = False
    smear: bool = False
    backout: bool = False

    def __post_init__(self) -> None:
        if not self.window_pattern or set(self.window_pattern) - set("SL"):
            raise ValueError(f"GPTConfig: window_pattern {self.window_pattern!r} must be a non-empty string of "
                             "S (short window) and L (full context), e.g. 'SSSL'")
        if self.vocab_size <= 0 or self.depth <= 0 or self.head_dim <= 0 or self.aspect_ratio <= 0:
            raise ValueError(f"GPTConfig: vocab_size, depth, aspect_ratio, head_dim must be positive: {self}")
        if self.model_dim % self.head_dim:
            raise ValueError(
                f"GPTConfig: model_dim {self.model_dim} (= aspect_ratio {self.aspect_ratio} × depth {self.depth}) "
                f"is not divisible by head_dim {self.head_dim}"
            )
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"GPTConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.smear and self.model_dim < SMEAR_CHANNELS:
            raise ValueError(f"GPTConfig: smear needs model_dim >= {SMEAR_CHANNELS}, got {self.model_dim}")
        if self.value_embeds and self.model_dim < VE_GATE_CHANNELS:
            raise ValueError(f"GPTConfig: value_embeds needs model_dim >= {VE_GATE_CHANNELS}, got {self.model_dim}")

    def has_value_embed(self, layer: int) -> bool:
        """Value embeddings sit on alternate layers, always including the last (nanochat's placement)."""
        return self.value_embeds and layer % 2 == (self.depth - 1) % 2

    @property
    def model_dim(self) -> int:
        return self.aspect_ratio * self.depth

    @property
    def n_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def short_window(self) -> int:
        """An S layer's window: a quarter of ``seq_len`` rounded up to a multiple of 128 (nanochat's rule,
        where 128 is FlashAttention-3's tile; kept so that a Kiln and a nanochat model of one config match)."""
        quarter = -(-self.seq_len // 4)
        return -(-quarter // 128) * 128

    def layer_windows(self) -> list[int | None]:
        """Per layer, how many earlier tokens a query sees besides itself (None: all of them). The pattern
        is tiled over the layers and the last layer is always full, so the output sees the whole context.
        An L layer is unlimited (nanochat caps it at ``seq_len``; the same within training, and generation
        past ``seq_len`` keeps Kiln's pre-window behaviour)."""
        tiled = [self.window_pattern[i % len(self.window_pattern)] for i in range(self.depth)]
        tiled[-1] = "L"
        return [self.short_window if c == "S" else None for c in tiled]

    @classmethod
    def from_model_config(cls, model_cfg: Any, vocab_size: int) -> "GPTConfig":
        """Build from ``llm.config.ModelConfig`` (or any object/dict with the same fields) plus a vocab size."""
        data = model_cfg if isinstance(model_cfg, dict) else model_cfg.model_dump()
        names = {f.name for f in fields(cls)} - {"vocab_size"}
        return cls(vocab_size=vocab_size, **{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The fields, minus the recipe options that are off: a model without them writes exactly the
        ``model_config`` it wrote before they existed, so its checkpoints compare equal to older ones (resume,
        midtrain from an old base model) and tools that know only the original fields (export) accept it."""
        data = asdict(self)
        for name, off in OPTIONAL_FIELDS.items():
            if data[name] == off:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {sorted(unknown)}")
        return cls(**data)


def _fused_head_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Training in full precision: the fused, chunked head loss (llm.lm_loss) applies. Under autocast
    (bf16 on GPU) the plain head keeps its mixed-precision matmul."""
    return torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (seq_len, head_dim/2), fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def window_mask(t_q: int, t_k: int, window: int | None, device: torch.device) -> torch.Tensor:
    """SDPA boolean mask (True = attend) for the last ``t_q`` of ``t_k`` positions over all ``t_k`` keys:
    causal, and at most ``window`` tokens back (a query sees ``window + 1`` keys, itself included)."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device).unsqueeze(1)
    back = q_pos - torch.arange(t_k, device=device).unsqueeze(0)
    mask = back >= 0
    return mask if window is None else mask & (back <= window)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim. x: (B, H, T, hd); cos/sin: (T, hd/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Per-layer key/value buffers for incremental decoding: (B, K, max_len, hd) each."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.pos = 0  # tokens already stored (same for every layer)
        self.max_len = max_len
        # The last position's normalised token embedding (B, 1, D), for models with ``smear``.
        self.prev_embedding: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KVCache overflow: {self.pos} + {t} > {self.max_len}")
        self.k[layer][:, :, self.pos:self.pos + t] = k
        self.v[layer][:, :, self.pos:self.pos + t] = v
        return self.k[layer][:, :, : self.pos + t], self.v[layer][:, :, : self.pos + t]

    def repeat(self, batch: int, extra: int) -> "KVCache":
        """A ``batch``-row cache whose every row starts with this one-row cache's tokens, room for ``extra`` more.

        Why: scoring several continuations of one shared prompt (CORE's choices) runs the prompt once
        at batch 1 and then all continuations at once on top of copies of its keys/values.
        """
        k0 = self.k[0]
        if k0.shape[0] != 1:
            raise ValueError(f"KVCache.repeat: expects a one-row cache, this one has {k0.shape[0]} rows")
        out = KVCache(len(self.k), batch, k0.shape[1], self.pos + extra, k0.shape[3], k0.device, k0.dtype)
        for src, dst in zip(self.k + self.v, out.k + out.v):
            dst[:, :, : self.pos] = src[:, :, : self.pos]
        out.pos = self.pos
        if self.prev_embedding is not None:  # smear reads the last cached token's embedding
            out.prev_embedding = self.prev_embedding.expand(batch, -1, -1).contiguous()
        return out


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.window = cfg.layer_windows()[layer]
        d = cfg.model_dim
        self.c_q = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.kv_heads, bias=False) if cfg.has_value_embed(layer) else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim)
        if ve is not None:  # value residual: this layer's value embedding, gated per kv head
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, K) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.kv_heads, self.head_dim)
        v = v.transpose(1, 2)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)
        gqa = self.kv_heads != self.n_heads
        if gqa and not _SDPA_GQA:
            rep = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        kw = {"enable_gqa": True} if (gqa and _SDPA_GQA) else {}
        if self.window is not None and k.shape[2] > self.window + 1:  # some query has keys out of its window
            mask = window_mask(T, k.shape[2], self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        elif T == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, **kw)
        else:  # a chunk after a prefix: causal within the chunk, full over the prefix
            s = k.shape[2]
            mask = torch.ones(T, s, dtype=torch.bool, device=x.device).tril(diagonal=s - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.model_dim, 4 * cfg.model_dim, bias=False)
        self.c_proj = nn.Linear(4 * cfg.model_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), cos, sin, cache, ve)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """The model. ``forward(idx, targets=None, reduction="mean")``; targets use -1 for "ignore"."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.model_dim)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.depth)])
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        self._add_options(config)
        # Rotary tables cover 4× the training context so generation can run a little past it; they are
        # derived data, not parameters, so they are neither saved nor counted.
        cos, sin = rotary_tables(4 * config.seq_len, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def _add_options(self, c: GPTConfig) -> None:
        """The optional recipe pieces' parameters; none exist when the options are off (old state dicts)."""
        kv_dim = c.kv_heads * c.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(c.vocab_size, kv_dim)
                                           for i in range(c.depth) if c.has_value_embed(i)})
        if c.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if c.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def _init_options(self) -> None:
        bound = math.sqrt(3.0) / math.sqrt(self.config.model_dim)  # like c_v, whose output they add to
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -bound, bound)
        for block in self.blocks:
            if block.attn.ve_gate is not None:  # small positive: gates start just above 3·σ(0) = 1.5
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        if self.config.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.smear_lambda)  # starts as the plain model
        if self.config.backout:
            nn.init.constant_(self.backout_lambda, 0.2)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Embedding ~ N(0, 1); matrices ~ U(±√3/√fan_in) (unit-variance outputs); residual outputs zero;
        lm_head tiny. Zero residual projections make every block start as the identity, which is what
        lets the high-LR recipe train from step 1 without warmup drama."""
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0) / math.sqrt(lin.in_features)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self._init_options()
        cos, sin = rotary_tables(self.rope_cos.shape[0], self.config.head_dim, self.config.rope_base, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    # ------------------------------------------------------------------ accounting
    def num_params(self) -> int:
        """Exact count of trainable parameters (embedding and lm_head included)."""
        return sum(p.numel() for p in self.parameters())

    def num_embedding_params(self) -> int:
        """Lookup tables: the token embedding and the value embeddings."""
        return self.wte.weight.numel() + sum(e.weight.numel() for e in self.value_embeds.values())

    def num_scaling_params(self) -> int:
        """The block matrices and the lm_head: the count a token budget (``tokens per parameter``) is
        taken over. nanochat's choice (its scaling-law runs fit most cleanly on this count): lookup tables
        cost no FLOPs per token, so counting them would hand big-vocabulary models extra data."""
        return sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()

    def _scalars(self) -> list[nn.Parameter]:
        return [p for name in ("smear_lambda", "backout_lambda") if (p := getattr(self, name, None)) is not None]

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6·(matmul weights) + 12·H·hd·Σ_layers min(window, seq_len) (see module
        docstring; a full layer's window is seq_len, so without windows that is 12·depth·H·hd·seq_len)."""
        c = self.config
        matmul = self.num_params() - self.num_embedding_params() - sum(p.numel() for p in self._scalars())
        spans = sum(c.seq_len if w is None else min(w, c.seq_len) for w in c.layer_windows())
        return 6 * matmul + 12 * c.n_heads * c.head_dim * spans

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, for optimizers: 'embedding', 'lm_head', 'matrices' (every block weight, the
        value-embedding gates included), 'value_embeds' and 'scalars' (smear gate and λ, backout λ); the
        last two are empty when their options are off."""
        smear = [self.smear_gate.weight] if self.config.smear else []
        return {
            "embedding": [self.wte.weight],
            "lm_head": [self.lm_head.weight],
            "matrices": [p for p in self.blocks.parameters()],
            "value_embeds": [e.weight for e in self.value_embeds.values()],
            "scalars": smear + self._scalars(),
        }

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) in fp32 when ``targets`` is None; else the cross-entropy.

        ``reduction="mean"`` averages over targets that are not -1 (0.0 when every target is ignored,
        rather than NaN, so a fully masked micro-batch cannot poison a run); ``"sum"`` sums them;
        ``"none"`` returns per-position loss (B, T) with 0 at ignored positions.
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + T} tokens exceeds the rotary table ({self.rope_cos.shape[0]})")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = rms_norm(self.wte(idx))
        if self.config.smear:
            x = self._smear(x, kv_cache)
        mid = None
        for i, block in enumerate(self.blocks):
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, kv_cache, ve)
            if i == self.config.depth // 2:
                mid = x
        if self.config.backout:
            x = x - self.backout_lambda * mid
        if kv_cache is not None:
            kv_cache.pos += T
        x = rms_norm(x)
        if targets is not None and reduction in ("mean", "sum") and _fused_head_ok(x, self.lm_head.weight):
            # Imported here, not at the top: this module must import nothing but torch, because the HF
            # remote-code export ships it as-is (kiln_gpt.py), where only inference (no targets) runs.
            from llm.lm_loss import head_loss_sum

            loss = head_loss_sum(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), self.config.softcap)
            return loss if reduction == "sum" else loss / (targets != -1).sum().clamp(min=1)
        logits = self.lm_head(x).float()
        cap = self.config.softcap
        if cap and cap > 0:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none")
        if reduction == "none":
            return loss.view(B, T)
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.sum() / (targets != -1).sum().clamp(min=1)
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    def _smear(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Add the gated previous token's embedding; across KV-cached chunks the previous token of a chunk's
        first position is the cache's ``prev_embedding`` (the first token of a sequence has none)."""
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (B, T, 1)
        before = cache.prev_embedding if (cache is not None and cache.pos > 0) else None
        if cache is not None:
            cache.prev_embedding = x[:, -1:]
        if before is not None:
            return x + gate * torch.cat([before.to(x.dtype), x[:, :-1]], dim=1)
        return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, stop_ids: set[int] | None = None) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` sampled token ids after the prompt ``ids`` (KV-cached).

        ``temperature <= 0`` is greedy. ``top_k`` keeps the k most likely tokens. ``seed`` makes sampling
        reproducible without touching the global RNG. Stops early after yielding a token in ``stop_ids``.
        """
        if not ids:
            raise ValueError("generate: the prompt must contain at least one token (e.g. BOS)")
        device = self.wte.weight.device
        max_len = min(len(ids) + max_new_tokens, self.rope_cos.shape[0])
        if len(ids) >= max_len:
            return
        # Under autocast, K/V come out in the autocast dtype: store them in that dtype.
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.wte.weight.dtype
        cache = KVCache(self.config.depth, 1, self.config.kv_heads, max_len, self.config.head_dim, device, dtype)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        logits = self.forward(torch.tensor([ids], dtype=torch.long, device=device), kv_cache=cache)[:, -1, :]
        for _ in range(max_len - len(ids)):
            if temperature <= 0:
                nxt = int(logits.argmax(dim=-1).item())
            else:
                scaled = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(scaled, min(top_k, scaled.size(-1)), dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                probs = F.softmax(scaled, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen).item())
            yield nxt
            if (stop_ids and nxt in stop_ids) or cache.pos >= max_len - 1:
                return
            logits = self.forward(torch.tensor([[nxt]], dtype=torch.long, device=device), kv_cache=cache)[:, -1, :]
