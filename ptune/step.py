"""One optimizer step of P-tuning: forward/backward over this rank's micro-batches, then the update.

Shared by the trainer and the benchmark, so the benchmark times exactly what training runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ptune.loss import lm_loss_sum


@dataclass
class StepResult:
    loss_sum: torch.Tensor   # this rank's summed token loss (divide by the global token count)
    tokens: torch.Tensor     # this rank's non-padding tokens
    grad_norm: float         # global, before clipping
    applied: bool            # False: fp16 overflow (update skipped) or non-finite values (nothing changed)


class MicroBatchLoss(nn.Module):
    """Summed token loss of one micro-batch: the unit an optimizer step repeats.

    `capturable=True` keeps every shape fixed and never waits for the GPU (a 4-D mask, every position
    through the loss), so a CUDA graph can hold the forward and backward pass; same loss either way.
    """

    def __init__(self, lm, loss_chunk_size: int, softcap: float | None, capturable: bool = False):
        super().__init__()
        self.lm, self.loss_chunk_size, self.softcap, self.capturable = lm, loss_chunk_size, softcap, capturable

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        hidden = self.lm.decoder(input_ids, attention_mask, full_mask=self.capturable)
        loss, _ = lm_loss_sum(hidden, labels, self.lm.base.get_output_embeddings(), self.loss_chunk_size,
                              self.softcap, select=not self.capturable)
        return loss


def gradient_buffers(params) -> None:
    """Zero-filled .grad for every parameter that has none. Gradients accumulate into buffers that exist
    before the first backward pass: a replayed graph hands out its gradient in memory it overwrites next
    replay, which autograd would otherwise adopt as .grad."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def optimizer_step(micro_loss_fn, params, batches, global_targets: int, optimizer, scaler, *,
                   max_grad_norm: float | None, world_size: int = 1, seeds: list[int] | None = None) -> StepResult:
    """Gradients of the loss over `batches`, normalised by `global_targets`, summed across ranks, clipped, applied.

    `micro_loss_fn(input_ids, attention_mask, labels)` is a `MicroBatchLoss` or its graph-replaying
    stand-in (ptune.graphs); `params` are the trainable prefix parameters. `seeds`, one per micro-batch,
    reseed the RNG (prefix dropout) before each forward pass.
    """
    device = params[0].device
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device, dtype=torch.long)
    gradient_buffers(params)
    for i, batch in enumerate(batches):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        micro_loss = micro_loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
        scaler.scale(micro_loss / global_targets).backward()
        loss_sum += micro_loss.detach()
        tokens += batch["attention_mask"].sum()
    if world_size > 1:
        # One flat buffer: the prefix is small, and one collective beats one per tensor.
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        applied = scaler.get_scale() >= scale_before
    elif math.isfinite(grad_norm) and bool(torch.isfinite(loss_sum)):
        optimizer.step()
        applied = True
    else:
        applied = False
    optimizer.zero_grad(set_to_none=False)
    return StepResult(loss_sum, tokens, grad_norm, applied)
