"""One optimizer step of P-tuning: forward/backward over this rank's micro-batches, then the update.

Shared by the trainer and the benchmark, so the benchmark times exactly what training runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptune.loss import lm_loss_sum


@dataclass
class StepResult:
    loss_sum: torch.Tensor   # this rank's summed token loss (divide by the global token count)
    tokens: torch.Tensor     # this rank's non-padding tokens
    grad_norm: float         # global, before clipping
    applied: bool            # False: fp16 overflow (update skipped) or non-finite values (nothing changed)


def optimizer_step(lm, batches, global_targets: int, optimizer, scaler, *, loss_chunk_size: int,
                   softcap: float | None, max_grad_norm: float | None, world_size: int = 1,
                   seeds: list[int] | None = None) -> StepResult:
    """Gradients of the loss over `batches`, normalised by `global_targets`, summed across ranks, clipped, applied.

    `seeds`, one per micro-batch, reseed the RNG (prefix dropout) before each forward pass.
    """
    head = lm.base.get_output_embeddings()
    params = [p for p in lm.prefix.parameters() if p.requires_grad]
    device = params[0].device
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device, dtype=torch.long)
    for i, batch in enumerate(batches):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        hidden = lm.decoder(batch["input_ids"], batch["attention_mask"])
        micro_loss, _ = lm_loss_sum(hidden, batch["labels"], head, loss_chunk_size, softcap)
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
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, tokens, grad_norm, applied)
