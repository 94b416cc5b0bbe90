"""Optimizers and learning-rate schedules for the trainer.

* AdamW (β 0.9/0.95, decoupled weight decay) over three groups: block matrices (with weight decay),
  the token embedding and the lm_head (never decayed — shrinking embeddings only hurts rare tokens).
* Muon for the block matrices (momentum SGD whose update is orthogonalised by a Newton–Schulz
  iteration), with AdamW for the embedding and lm_head, as in nanochat/modded-nanoGPT.

Every param group stores ``base_lr``; the trainer sets ``lr = base_lr · lr_multiplier(step)``.
Under DDP the gradients are already all-reduced when ``step()`` runs, so every rank performs the same
(replicated) update and the optimizer state is identical across ranks — rank 0 alone saves it.
"""

from __future__ import annotations

import math
from typing import Any

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


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised update for 2-D weight matrices. lr is in units of RMS update per step.

    Matrices of one shape are updated together: the momentum and the parameter update are ``_foreach``
    ops over the group, and the orthogonalisation runs once on the stacked (k, m, n) batch, through
    ``orthogonalise`` — :func:`newton_schulz`, or its ``torch.compile``-d form with ``compile=True``
    (nanochat compiles its Muon step too). The state stays one ``momentum_buffer`` per parameter, so
    checkpoints written before the batching load unchanged.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, compile: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.orthogonalise = torch.compile(newton_schulz, dynamic=False) if compile else newton_schulz

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
        """One update of same-shape matrices: momentum, orthogonalised step, decoupled weight decay."""
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        bufs = [self._buffer(p) for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - mom)
        g = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
        update = self.orthogonalise(torch.stack(g), group["ns_steps"])
        # Scale so tall and wide matrices get comparable per-element update sizes.
        scale = max(1.0, params[0].size(0) / params[0].size(1)) ** 0.5
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr * scale)

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        return state["momentum_buffer"]


class Optimizers:
    """Several torch optimizers driven as one (step, zero_grad, set lr, state_dict)."""

    def __init__(self, opts: list[torch.optim.Optimizer]):
        self.opts = opts
        for opt in opts:
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

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


def build_optimizers(model: Any, train_cfg: Any, *, fused: bool = False, compile: bool = False) -> Optimizers:
    """AdamW (or Muon + AdamW) over the model's parameter roles (``GPT.param_groups()``).

    ``fused``: torch's fused AdamW kernel (CUDA). ``compile`` (``train.compile``): the fused AdamW kernel
    on any device, and Muon's orthogonalisation compiled — the optimizer-side half of compiling the step.
    """
    groups = model.param_groups()
    emb_lr = train_cfg.embedding_lr if train_cfg.embedding_lr is not None else train_cfg.lr
    betas = (train_cfg.beta1, train_cfg.beta2)
    kw: dict[str, Any] = {"fused": True} if (fused or compile) else {}
    if train_cfg.optimizer == "adamw":
        unemb_lr = train_cfg.unembedding_lr if train_cfg.unembedding_lr is not None else train_cfg.lr
        adam = torch.optim.AdamW([
            {"params": groups["matrices"], "lr": train_cfg.lr, "weight_decay": train_cfg.weight_decay, "name": "matrices"},
            {"params": groups["embedding"], "lr": emb_lr, "weight_decay": 0.0, "name": "embedding"},
            {"params": groups["lm_head"], "lr": unemb_lr, "weight_decay": 0.0, "name": "lm_head"},
        ], lr=train_cfg.lr, betas=betas, eps=1e-8, **kw)
        return Optimizers([adam])
    if train_cfg.optimizer == "muon":
        unemb_lr = train_cfg.unembedding_lr if train_cfg.unembedding_lr is not None else 0.004
        adam = torch.optim.AdamW([
            {"params": groups["embedding"], "lr": emb_lr, "weight_decay": 0.0, "name": "embedding"},
            {"params": groups["lm_head"], "lr": unemb_lr, "weight_decay": 0.0, "name": "lm_head"},
        ], lr=unemb_lr, betas=betas, eps=1e-10, **kw)
        muon = Muon([{"params": groups["matrices"], "name": "matrices"}], lr=train_cfg.lr,
                    weight_decay=train_cfg.weight_decay, compile=compile)
        return Optimizers([adam, muon])
    raise ValueError(f"unknown optimizer {train_cfg.optimizer!r} (adamw, muon)")
