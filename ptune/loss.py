"""Next-token cross-entropy over the response tokens, without materialising logits for the whole batch.

Only positions that predict a labelled token are projected onto the vocabulary, in chunks, and where
there is more than one chunk each is recomputed in the backward pass; peak memory is one chunk of
logits instead of batch x length x vocab. Picking those positions out has a data-dependent size,
which CUDA graphs cannot hold; `select=False` projects every position instead and lets the loss
ignore the unlabelled ones (same sum, fixed shapes). On CUDA the cross-entropy runs as two Triton
passes over the logits in their own dtype (ptune.loss_kernels) instead of through a float32 copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ptune.data import IGNORE


_CE_BLOCK = 4096  # vocabulary entries a kernel iteration reads


class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of (rows, vocab) CUDA logits in their own dtype (ptune.loss_kernels)."""

    @staticmethod
    def forward(ctx, logits, targets):
        from ptune import loss_kernels

        rows, vocab = logits.shape
        losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(losses)
        loss_kernels.cross_entropy_fwd[(rows,)](logits, targets, losses, lse, logits.stride(0), vocab, IGNORE,
                                                BLOCK=_CE_BLOCK, num_warps=8)
        ctx.save_for_backward(logits, targets, lse)
        return losses.sum()

    @staticmethod
    def backward(ctx, dloss):
        from ptune import loss_kernels

        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        loss_kernels.cross_entropy_bwd[(logits.shape[0],)](logits, targets, lse, grad, dloss.contiguous(),
                                                           logits.stride(0), grad.stride(0), logits.shape[1], IGNORE,
                                                           BLOCK=_CE_BLOCK, num_warps=8)
        return grad, None


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None):
    logits = head(hidden)
    if logits.is_cuda and not softcap and logits.stride(-1) == 1:
        return _CrossEntropySum.apply(logits, targets.contiguous())
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)


def lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_size: int = 1024,
                softcap: float | None = None, select: bool = True) -> tuple[torch.Tensor, int | None]:
    """(sum of token losses, number of tokens) for hidden states `(B, T, H)` and labels `(B, T)`.

    Position t predicts label t+1. The caller divides by the token count of the whole global batch, so
    micro-batches, accumulation steps and data-parallel ranks all weigh every token equally.
    With `select=False` nothing waits for the GPU and the count is None.
    """
    targets = labels[:, 1:]
    if select:
        keep = targets != IGNORE
        h, y = hidden[:, :-1][keep], targets[keep]
    else:
        h, y = hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    # One chunk's logits are alive at the end of the forward pass either way, so recomputing them in the
    # backward pass would cost an output-layer matmul and save no memory.
    recompute = y.numel() > chunk_size
    for start in range(0, y.numel(), chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if recompute and torch.is_grad_enabled() and hc.requires_grad:
            # No RNG state to keep (nothing random in the head), and saving it is not allowed in a CUDA graph.
            total = total + checkpoint(_chunk_loss, hc, yc, head, softcap, use_reentrant=False,
                                       preserve_rng_state=False)
        else:
            total = total + _chunk_loss(hc, yc, head, softcap)
    return total, int(y.numel()) if select else None


def output_softcap(config) -> float | None:
    """Final-logit soft-capping of Gemma-2-style models, which the output layer alone does not apply."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "final_logit_softcapping", None)
