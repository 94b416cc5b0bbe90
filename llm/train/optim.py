"""Optimizers and learning-rate schedules for the trainer.

* AdamW (β 0.9/0.95, decoupled weight decay) over three groups: block matrices (with weight decay),
  the token embedding and the lm_head (never decayed — shrinking embeddings only hurts rare tokens).
* Muon for the block matrices (momentum SGD whose update is orthogonalised by a Newton–Schulz
  iteration), with AdamW for the embedding and lm_head, as in nanochat/modded-nanoGPT. Options from
  nanochat HEAD's recipe, each a ``TrainConfig`` switch: Polar Express orthogonalisation, NorMuon
  per-neuron normalisation, cautious weight decay, a cosine weight-decay schedule and a momentum schedule
  (applied per step by ``Optimizers.set_step``). The model's optional value embeddings and scalar gates
  get their own AdamW groups (``value_embeds``, ``scalars``).

Every param group stores ``base_lr``; the trainer sets ``lr = base_lr · lr_multiplier(step)``.
Under DDP the gradients are already all-reduced when ``step()`` runs, so every rank performs the same
(replicated) update and the optimizer state is identical across ranks — rank 0 alone saves it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch


def lr_multiplier(step: int, total_steps: int, *, schedule: str, warmup_steps: int = 0, warmdown_frac: float = 0.2,
                  min_lr_frac: float = 0.0) -> float:
    """LR multiplier for optimizer step ``step`` (0-based) of ``total_steps``.

    * warmup: linear from 1/warmup to 1 over ``warmup_steps``;
    * ``cosine``: cosine from 1 to ``min_lr_frac`` over the steps after warmup;
    * ``linear``: constant 1, then a LINEAR warmdown to ``min_lr_frac`` over the last ``warmdown_frac`` of the run
      (nanochat's trapezoid);
    * ``wsd``: warmup–stable–decay with the (1 − √t) cooldown over the last ``warmdown_frac``
      (Hägele et al. 2024 found it beats a linear cooldown).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    lo = min_lr_frac
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        p = min(1.0, (step - warmup_steps) / span)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule in ("linear", "wsd"):
        decay_steps = int(round(warmdown_frac * total_steps))
        start = total_steps - decay_steps
        if decay_steps <= 0 or step < start:
            return 1.0
        t = min(1.0, (step - start + 1) / decay_steps)  # reaches min_lr_frac on the final step
        shape = t if schedule == "linear" else math.sqrt(t)
        return lo + (1 - lo) * (1 - shape)
    raise ValueError(f"unknown LR schedule {schedule!r} (cosine, linear, wsd)")


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G (replace its singular values by ~1) with a quintic Newton–Schulz
    iteration tuned to converge fast from a Frobenius-normalised start. bf16 on CUDA (fast, the iteration
    tolerates it), fp32 elsewhere (CPU bf16 matmul is slow and we want exact reproducibility)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


# Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv:2505.16932, Algorithm 1 with 5 iterations,
# safety factor 2e-2, cushion 2): a different odd quintic per iteration, each chosen to be minimax-optimal
# for the interval of singular values the previous ones leave. It gets closer to the polar factor UVᵀ than
# the fixed-coefficient iteration in the same 5 matmul rounds (which leaves singular values in ~[0.7, 1.2]).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Orthogonalise G with the Polar Express iteration (same dtype policy as :func:`newton_schulz`).

    The start is scaled a little below unit spectral norm (Frobenius × 1.01) because the first, very
    aggressive polynomial is only safe on [0, 1]."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


ORTHOGONALIZERS = {"newton_schulz": newton_schulz, "polar_express": polar_express}


def normuon_rescale(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (arXiv:2510.05491): even out the per-neuron scale of an orthogonalised update.

    An orthogonalised update has equal singular values but not equal row (neuron) norms. Keep an EMA of
    each row's mean square (each column's, for wide matrices, so the state is the smaller side), divide the
    update by its square root, then rescale to the update's original Frobenius norm, so the step SIZE is
    still Muon's and only its distribution across neurons changes. ``second_moment`` is updated in place.
    Works on one matrix or a stacked batch of same-shape matrices (with stacked moments)."""
    dim = -1 if update.size(-2) >= update.size(-1) else -2
    ms = update.float().square().mean(dim=dim, keepdim=True)
    second_moment.lerp_(ms, 1 - beta2)
    scaled = update.float() * second_moment.clamp_min(1e-10).rsqrt()
    # Per matrix (a stacked (k, m, n) batch keeps each matrix's own norm).
    norms = (-2, -1)
    scaled = scaled * (update.float().norm(dim=norms, keepdim=True) / scaled.norm(dim=norms, keepdim=True).clamp_min(1e-10))
    return scaled.to(update.dtype)


def apply_weight_decay(p: torch.Tensor, update: torch.Tensor, lr: float, wd: float, cautious: bool) -> None:
    """Decoupled weight decay ``p -= lr·wd·p`` before the step ``p -= lr·update``.

    ``cautious`` (Chen et al. 2025, "Cautious Weight Decay") decays only the entries where the update
    already pushes the weight toward zero (update and weight agree in sign), so decay never fights the
    gradient's direction."""
    if not wd:
        return
    if cautious:
        p.sub_(p * (update * p >= 0), alpha=lr * wd)
    else:
        p.mul_(1 - lr * wd)


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised update for 2-D weight matrices. lr is in units of RMS update per step.

    Options (each off = the original Muon): ``orthogonalizer`` (``newton_schulz`` | ``polar_express``),
    ``normuon`` (per-neuron variance normalisation with EMA ``beta2``), ``cautious_wd``. ``momentum`` and
    ``weight_decay`` are per group so a schedule can move them every step (``Optimizers.set_step``).

    Matrices of one shape are updated together: the momentum and the parameter update are ``_foreach``
    ops over the group, and the orthogonalisation runs once on the stacked (k, m, n) batch, ``torch.compile``-d
    with ``compile=True`` (nanochat compiles its Muon step too). The state stays one ``momentum_buffer`` (and
    ``second_moment``) per parameter, so checkpoints written before the batching load unchanged.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, orthogonalizer: str = "newton_schulz", normuon: bool = False,
                 beta2: float = 0.95, cautious_wd: bool = False, compile: bool = False):
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"unknown Muon orthogonalizer {orthogonalizer!r} ({', '.join(ORTHOGONALIZERS)})")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, orthogonalizer=orthogonalizer, normuon=normuon,
                                      beta2=beta2, cautious_wd=cautious_wd))
        self.orthogonalisers = {name: torch.compile(fn, dynamic=False) if compile else fn
                                for name, fn in ORTHOGONALIZERS.items()}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2-D parameters, got shape {tuple(p.shape)}")
            for shape in sorted({tuple(p.shape) for p in params}):
                self._update(group, [p for p in params if tuple(p.shape) == shape])
        return None

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One update of same-shape matrices: momentum → orthogonalise → optional NorMuon → shape scale,
        then decoupled (optionally cautious) weight decay and the step."""
        lr, mom = group["lr"], group["momentum"]
        grads = [p.grad for p in params]
        bufs = [self._state(p, "momentum_buffer", p.shape, p.grad.dtype) for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - mom)
        g = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
        update = self.orthogonalisers[group.get("orthogonalizer", "newton_schulz")](torch.stack(g), group["ns_steps"])
        if group.get("normuon"):
            m, n = params[0].shape
            small = (m, 1) if m >= n else (1, n)
            moments = torch.stack([self._state(p, "second_moment", small, torch.float32) for p in params])
            update = normuon_rescale(update, moments, group["beta2"])
            for p, sm in zip(params, moments.unbind(0)):
                self.state[p]["second_moment"].copy_(sm)
        # Scale so tall and wide matrices get comparable per-element update sizes.
        update = update * max(1.0, params[0].size(0) / params[0].size(1)) ** 0.5
        updates = list(update.unbind(0))
        if group.get("cautious_wd"):
            for p, u in zip(params, updates):
                apply_weight_decay(p, u, lr, group["weight_decay"], True)
        elif group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, updates, alpha=-lr)

    def _state(self, p: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        state = self.state[p]
        if name not in state:
            state[name] = torch.zeros(shape, dtype=dtype, device=p.device)
        return state[name]


def muon_momentum_at(step: int, total_steps: int, *, peak: float, warmup_steps: int, warmdown_frac: float,
                     start: float = 0.85, end: float = 0.90) -> float:
    """Muon momentum for ``step`` under the momentum schedule (nanochat HEAD's shape).

    Low momentum early (``start``) lets the first, noisy steps be forgotten quickly; it ramps linearly to
    ``peak`` over ``warmup_steps`` and, during the LR warmdown (the last ``warmdown_frac`` of the run), falls
    linearly to ``end`` so the final small steps follow the recent gradients rather than stale momentum."""
    mom = start + (peak - start) * min(1.0, step / max(1, warmup_steps))
    decay = int(round(warmdown_frac * total_steps))
    begin = total_steps - decay
    if decay > 0 and step >= begin:
        mom += (end - mom) * min(1.0, (step - begin) / decay)
    return mom


def weight_decay_at(step: int, total_steps: int, *, base: float, schedule: str) -> float:
    """Weight decay for ``step``: ``constant``, or ``cosine`` from ``base`` to 0 over the run (decay matters
    most early, when weights grow fastest, and least at the end, where it would pull against the fit)."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
    raise ValueError(f"unknown weight decay schedule {schedule!r} (constant, cosine)")


class Optimizers:
    """Several torch optimizers driven as one (step, zero_grad, set lr, state_dict)."""

    def __init__(self, opts: list[torch.optim.Optimizer],
                 per_step: Callable[[int, int], dict[str, float]] | None = None):
        self.opts = opts
        # Muon's per-step hyper-parameters (momentum, weight decay) as a function of (step, total steps).
        self.per_step = per_step
        for opt in opts:
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    def set_step(self, step: int, total_steps: int) -> None:
        """Apply the per-step schedules (Muon momentum / weight decay) for optimizer step ``step``."""
        if self.per_step is None:
            return
        values = self.per_step(step, total_steps)
        for opt in self.opts:
            if isinstance(opt, Muon):
                for g in opt.param_groups:
                    g.update(values)

    def set_lr_multiplier(self, mult: float) -> None:
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult

    def step(self) -> None:
        for opt in self.opts:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.opts], "kinds": [type(o).__name__ for o in self.opts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kinds = [type(o).__name__ for o in self.opts]
        if state.get("kinds") != kinds:
            raise ValueError(f"optimizer state is for {state.get('kinds')}, this run uses {kinds}")
        for opt, s in zip(self.opts, state["optimizers"]):
            opt.load_state_dict(s)

    def group_lrs(self) -> dict[str, float]:
        return {g.get("name", f"g{i}"): g["lr"] for opt in self.opts for i, g in enumerate(opt.param_groups)}


def _adam_groups(groups: dict[str, list], emb_lr: float, unemb_lr: float, train_cfg: Any) -> list[dict[str, Any]]:
    """The AdamW groups for the non-matrix roles; roles the model does not have (empty) are left out so
    an optimizer state saved before a role existed still lines up group for group."""
    specs = [("embedding", emb_lr), ("lm_head", unemb_lr),
             # value embeddings are embeddings read once per layer: half the embedding LR (nanochat's choice)
             ("value_embeds", emb_lr * 0.5), ("scalars", train_cfg.scalar_lr)]
    return [{"params": groups[name], "lr": lr, "weight_decay": 0.0, "name": name}
            for name, lr in specs if groups.get(name)]


def _muon_per_step(train_cfg: Any) -> Callable[[int, int], dict[str, float]] | None:
    tc = train_cfg
    if not tc.muon_momentum_schedule and tc.wd_schedule == "constant":
        return None

    def per_step(step: int, total: int) -> dict[str, float]:
        out = {"weight_decay": weight_decay_at(step, total, base=resolved(tc, "weight_decay"), schedule=tc.wd_schedule)}
        if tc.muon_momentum_schedule:
            out["momentum"] = muon_momentum_at(step, total, peak=tc.muon_momentum, warmup_steps=tc.muon_momentum_warmup,
                                               warmdown_frac=tc.warmdown_frac)
        return out

    return per_step


# What a ``None`` in TrainConfig means under each optimizer. Muon's Adam LRs are for model_dim 768 and
# scale as 1/√(model_dim/768) (nanochat's rule: wider models take smaller Adam steps on embeddings and
# lm_head); at d4 that gives 0.35 / 0.007, the values measured in bench/results_quality.md.
ADAMW_DEFAULTS = {"embedding_lr": None, "unembedding_lr": None, "weight_decay": 0.0, "beta1": 0.9}  # None: lr
MUON_DEFAULTS = {"embedding_lr": 0.2, "unembedding_lr": 0.004, "weight_decay": 0.28, "beta1": 0.8}
MUON_SCALED = ("embedding_lr", "unembedding_lr")


def resolved(train_cfg: Any, name: str, model_dim: int = 768) -> float:
    """``train_cfg.<name>``, or the optimizer's default for it when unset (``None``)."""
    value = getattr(train_cfg, name)
    if value is not None:
        return value
    if train_cfg.optimizer != "muon":
        value = ADAMW_DEFAULTS[name]
        return train_cfg.lr if value is None else value
    scale = (768 / model_dim) ** 0.5 if name in MUON_SCALED else 1.0
    return MUON_DEFAULTS[name] * scale


def scaling_params(mcfg: Any) -> int:
    """``GPT.num_scaling_params()`` for a ``GPTConfig``, counted on the meta device (no memory, no init)."""
    from llm.model import GPT

    with torch.device("meta"):
        return GPT(mcfg).num_scaling_params()


def scaled_for_depth(train_cfg: Any, mcfg: Any) -> Any:
    """``train_cfg`` with nanochat's depth rules applied when ``depth_scaling`` is on (else unchanged).

    The rules (``llm.train.plan.depth_scaling``) set the total batch from the model's token horizon and
    scale every LR and the weight decay to match. The result carries concrete values and
    ``depth_scaling=False``, so applying it twice changes nothing and what a run logs is what it used."""
    if not getattr(train_cfg, "depth_scaling", False):
        return train_cfg
    from llm.train.plan import REF_DEPTH, depth_scaling

    ref = dataclasses.replace(mcfg, depth=REF_DEPTH)
    rule = depth_scaling(train_cfg.target_param_data_ratio, scaling_params(mcfg), scaling_params(ref))
    dim, lr_s = mcfg.model_dim, rule["lr_scale"]
    return train_cfg.model_copy(update={
        "depth_scaling": False, "total_batch_tokens": rule["total_batch_tokens"], "lr": train_cfg.lr * lr_s,
        "embedding_lr": resolved(train_cfg, "embedding_lr", dim) * lr_s,
        "unembedding_lr": resolved(train_cfg, "unembedding_lr", dim) * lr_s,
        "scalar_lr": train_cfg.scalar_lr * lr_s,
        "weight_decay": resolved(train_cfg, "weight_decay") * rule["wd_scale"],
    })


def build_optimizers(model: Any, train_cfg: Any, *, fused: bool = False, compile: bool = False) -> Optimizers:
    """AdamW (or Muon + AdamW) over the model's parameter roles (``GPT.param_groups()``).

    ``fused``: torch's fused AdamW kernel (CUDA). ``compile`` (``train.compile``): the fused AdamW kernel
    on any device, and Muon's orthogonalisation compiled — the optimizer-side half of compiling the step.
    """
    groups = model.param_groups()
    dim = model.config.model_dim
    emb_lr, wd = resolved(train_cfg, "embedding_lr", dim), resolved(train_cfg, "weight_decay")
    betas = (resolved(train_cfg, "beta1"), train_cfg.beta2)
    kw: dict[str, Any] = {"fused": True} if (fused or compile) else {}
    if train_cfg.optimizer == "adamw":
        unemb_lr = resolved(train_cfg, "unembedding_lr")
        adam = torch.optim.AdamW([
            {"params": groups["matrices"], "lr": train_cfg.lr, "weight_decay": wd, "name": "matrices"},
            *_adam_groups(groups, emb_lr, unemb_lr, train_cfg),
        ], lr=train_cfg.lr, betas=betas, eps=1e-8, **kw)
        return Optimizers([adam])
    if train_cfg.optimizer == "muon":
        unemb_lr = resolved(train_cfg, "unembedding_lr", dim)
        adam = torch.optim.AdamW(_adam_groups(groups, emb_lr, unemb_lr, train_cfg),
                                 lr=unemb_lr, betas=betas, eps=1e-10, **kw)
        muon = Muon([{"params": groups["matrices"], "name": "matrices"}], lr=train_cfg.lr,
                    momentum=train_cfg.muon_momentum, weight_decay=wd,
                    orthogonalizer=train_cfg.muon_orthogonalizer, normuon=train_cfg.muon_normuon,
                    beta2=train_cfg.muon_beta2, cautious_wd=train_cfg.cautious_wd, compile=compile)
        return Optimizers([adam, muon], per_step=_muon_per_step(train_cfg))
    raise ValueError(f"unknown optimizer {train_cfg.optimizer!r} (adamw, muon)")
