"""The training step's speed mechanics keep its math: the fused head loss, the batched and the compiled optimizer.

* The fused, chunked head (``llm.lm_loss``) gives the plain head's loss and gradients, never holds the
  (N, V) logits for backward, and treats ignored targets (-1) like the plain head.
* Muon updates same-shape matrices as one batch: identical to updating each matrix on its own.
* ``train.compile`` compiles the optimizer updates (Muon's orthogonalisation, the fused AdamW kernel):
  the parameters after a few steps equal eager's within float tolerance.
"""

from __future__ import annotations

import pytest
import torch

from llm.config import TrainConfig
from llm.model import GPT, GPTConfig
from llm.train.optim import Muon, build_optimizers, newton_schulz

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(softcap: float = 15.0, vocab: int = 300) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=vocab, depth=2, aspect_ratio=32, head_dim=16, seq_len=64, softcap=softcap))
    with torch.no_grad():  # a non-zero lm_head and residual outputs, so every gradient is exercised
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _grads(m: GPT, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("softcap", [15.0, 0.0])
def test_fused_head_loss_equals_the_plain_head(softcap):
    """The mean training loss (fused) against the per-position losses (plain head) averaged by hand:
    same value, same gradient for every parameter, with ignored targets in the batch."""
    m = _model(softcap)
    x = torch.randint(0, 300, (6, 64))  # 384 rows: several chunks of the fused head
    y = torch.randint(0, 300, (6, 64))
    y[0, :10] = -1
    y[3] = -1
    fused = m(x, y)
    plain = m(x, y, reduction="none").sum() / (y != -1).sum()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    gf, gp = _grads(m, m(x, y)), _grads(m, plain)
    for name in gf:
        assert torch.allclose(gf[name], gp[name], rtol=1e-4, atol=1e-6), name
    summed = m(x, y, reduction="sum")
    assert summed.item() == pytest.approx(m(x, y, reduction="none").sum().item(), rel=1e-6)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_fused_head_soft_cap_matches_tanh_from_tiny_to_overflowing_logits(scale):
    """The head's soft-cap goes through exp (cheaper than torch's CPU tanh): near-zero logits, ordinary ones,
    and raw logits so large that exp(2u) overflows to inf must all give the plain head's loss and gradients."""
    from llm.lm_loss import head_loss_sum

    torch.manual_seed(0)
    x = (torch.randn(200, 32) * scale).requires_grad_()
    w = torch.randn(50, 32).requires_grad_()
    y = torch.randint(0, 50, (200,))
    fused = head_loss_sum(x, w, y, 15.0)
    gx, gw = torch.autograd.grad(fused, (x, w))
    plain = torch.nn.functional.cross_entropy(15.0 * torch.tanh((x @ w.t()) / 15.0), y, reduction="sum")
    px, pw = torch.autograd.grad(plain, (x, w))
    assert torch.isfinite(fused) and fused.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(gx, px, rtol=1e-4, atol=1e-5) and torch.allclose(gw, pw, rtol=1e-4, atol=1e-4 * max(1.0, scale))


def test_fused_head_loss_of_a_fully_ignored_batch_is_zero_with_zero_gradients():
    m = _model()
    x, y = torch.randint(0, 300, (2, 64)), torch.full((2, 64), -1)
    g = _grads(m, m(x, y))
    assert m(x, y).item() == 0.0
    assert all(torch.count_nonzero(t) == 0 for t in g.values())


def test_training_forward_does_not_keep_the_logits_for_backward():
    """The memory the fused head saves: nothing of (N, V) size is kept for the backward pass."""
    m = _model(vocab=4096)
    x, y = torch.randint(0, 4096, (4, 64)), torch.randint(0, 4096, (4, 64))
    biggest = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: biggest.append(t.numel()) or t, lambda t: t):
        loss = m(x, y)
    loss.backward()
    n_rows, dim = x.numel(), m.config.model_dim
    assert n_rows > dim  # so the lm_head weight (V × D) is smaller than the logits (N × V)
    assert max(biggest) <= 4096 * dim, f"a saved tensor of {max(biggest):,} values (logits: {n_rows * 4096:,})"


def _reference_muon(params, grads_per_step, lr, wd, momentum=0.95):
    """Muon on each matrix alone, written out: Nesterov momentum, Newton–Schulz, scaled step, decay."""
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, b in zip(params, grads, bufs):
            b.lerp_(g, 1 - momentum)
            u = newton_schulz(g.lerp(b, momentum), 5)
            p.mul_(1 - lr * wd)
            p.add_(u, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
    return params


def _muon_inputs(steps: int = 3):
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 32), (128, 32), (32, 32), (32, 128), (128, 32)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return params, grads


def test_batched_muon_equals_updating_each_matrix_alone():
    params, grads = _muon_inputs()
    ref = _reference_muon([p.clone() for p in params], grads, lr=0.02, wd=0.1)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Muon(ps, lr=0.02, weight_decay=0.1)
    for step in grads:
        for p, gr in zip(ps, step):
            p.grad = gr.clone()
        opt.step()
    for a, b in zip(ref, ps):
        assert torch.allclose(a, b.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_compiled_optimizer_step_matches_eager(optimizer):
    """``compile=True`` (what ``train.compile`` passes): same parameters as eager after 3 steps."""
    tc = TrainConfig(optimizer=optimizer, lr=0.02 if optimizer == "muon" else 3e-3, weight_decay=0.1,
                     embedding_lr=0.05, unembedding_lr=0.01)
    results = []
    for compile_ in (False, True):
        m = _model()
        opt = build_optimizers(m, tc, compile=compile_)
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            opt.set_lr_multiplier(1.0 - 0.2 * step)  # a changing LR must not break (or recompile) the step
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
