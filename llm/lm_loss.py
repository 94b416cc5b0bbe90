"""The training loss head, fused: ``lm_head`` matmul → soft-cap → cross-entropy, in row chunks.

Why: with a vocabulary of V the logits are an (N, V) fp32 tensor (8 × 512 × 8192 = 128 MiB for Kiln's CPU
shape), and the unfused head walks it about ten times (the matmul's output, divide, tanh, multiply,
log-softmax, and their backward ops, plus the zero-filled gradient). On a CPU those passes are
memory-bound and took ~20 % of a training step. Here each chunk of rows goes through the whole head,
forward AND backward, while it sits in cache: the gradients with respect to the hidden states and the
lm_head weight are computed in the forward pass (the loss is a sum, so its backward is only a scale),
and the full logits are never materialised — which also saves their memory.

Numerically it is the same function as ``cross_entropy(softcap·tanh((x Wᵀ)/softcap), y)`` summed over
targets that are not -1; results differ from the unfused head only by float rounding (the weight
gradient is accumulated chunk by chunk).
"""

from __future__ import annotations

import torch

# Rows per chunk: chunk × V fp32 values should stay cache-sized (~4 MiB at V = 8192).
_CHUNK_VALUES = 1 << 20


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab``: at least 64 so the matmuls stay efficient."""
    return max(64, _CHUNK_VALUES // max(vocab, 1))


class _HeadLossSum(torch.autograd.Function):
    """Sum of soft-capped cross-entropy over targets != -1; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, softcap: float,
                chunk: int) -> torch.Tensor:
        gx = torch.empty_like(x)
        gw = torch.zeros_like(w)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        # On CPU, (rows, D) @ (D, V) runs ~30 % faster with the (D, V) operand contiguous than as a
        # transposed view of the (V, D) weight (0.42 s → 0.31 s per step's head at D=256, V=8192; the copy
        # takes 5 ms). CUDA's GEMMs take either layout at full speed, so there the view stays.
        wt = w.t().contiguous() if w.device.type == "cpu" else w.t()
        for s in range(0, x.shape[0], chunk):
            xc, tc = x[s:s + chunk], targets[s:s + chunk]
            total += _chunk(xc, w, wt, tc, softcap, gx[s:s + chunk], gw)
        ctx.save_for_backward(gx, gw)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        gx, gw = ctx.saved_tensors
        return gx * grad.to(gx.dtype), gw * grad.to(gw.dtype), None, None, None


def _chunk(xc: torch.Tensor, w: torch.Tensor, wt: torch.Tensor, tc: torch.Tensor, softcap: float,
           gx_out: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    """One chunk's loss sum; writes d(loss)/d(xc) into ``gx_out`` and adds d(loss)/d(w) into ``gw``.
    ``wt`` is ``w.t()`` (contiguous on CPU).

    Every elementwise step works in place on the chunk's one (rows, V) buffer. With a soft-cap the
    logits lie in [-cap, cap], so ``exp`` cannot overflow and the max-subtraction of a stable softmax
    is skipped (one pass fewer); without one it is kept.
    """
    z = (xc @ wt).float()
    t = None
    if softcap and softcap > 0:
        t = _tanh_via_exp(z, 1.0 / softcap)
        z = torch.mul(t, softcap, out=z)
        shift = None
    else:
        shift = z.amax(dim=-1, keepdim=True)
        z.sub_(shift)
    keep = (tc != -1).to(z.dtype)
    tgt = tc.clamp(min=0).unsqueeze(1)
    z_target = z.gather(1, tgt).squeeze(1)
    e = z.exp_()  # z's buffer now holds exp(z)
    total = e.sum(dim=-1)
    loss = ((total.log() - z_target) * keep).sum()  # the shift cancels out of lse - z_target
    g = e.mul_((keep / total).unsqueeze(1))  # softmax, zero on ignored rows
    g.scatter_add_(1, tgt, -keep.unsqueeze(1))  # minus the one-hot target
    if t is not None:
        g.addcmul_(g, t.square_(), value=-1)  # chain rule through the cap: × (1 − tanh²)
    g = g.to(w.dtype)
    torch.mm(g, w, out=gx_out)
    gw.addmm_(g.t(), xc)
    return loss


def _tanh_via_exp(z: torch.Tensor, scale: float) -> torch.Tensor:
    """``tanh(scale·z)`` as ``1 − 2/(1 + exp(2·scale·z))``, in a new buffer.

    Why: on CPU torch's vectorised tanh costs ~3× its exp (150 vs 55 ms for one step's 4096 × 8192
    logits here), and the head is a third of a step. The form is exact in the limits (exp overflowing to
    inf gives 1, underflowing to 0 gives −1) and off from tanh by ~1e-7 absolute near 0, far below what
    the soft-capped logits (×15) carry into the softmax."""
    t = torch.mul(z, 2.0 * scale).exp_()
    return t.add_(1.0).reciprocal_().mul_(-2.0).add_(1.0)


@torch.compiler.disable
def head_loss_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Sum over positions with ``targets != -1`` of the soft-capped cross-entropy of ``x @ weight.T``.

    ``x``: (N, D) final hidden states; ``weight``: (V, D) lm_head; ``targets``: (N,) with -1 = ignore.
    Under ``torch.compile`` it runs as it is (a graph break): tracing would unroll the chunk loop into a
    graph that took minutes to compile on CPU, for no faster a head.
    """
    return _HeadLossSum.apply(x, weight, targets, float(softcap or 0.0), chunk_rows(weight.shape[0]))
