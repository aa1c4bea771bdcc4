"""The largest micro-batch that fits a memory ceiling, measured on the GPU (`trainer.auto_micro_batch_gib`).

A step's rows on one rank (per_device_batch_size x gradient_accumulation_steps) can be cut into
micro-batches of any divisor of that count without changing the step's gradient (the loss is normalised
by the step's target tokens), only its memory and speed; larger micro-batches keep the GPU busier. For
each candidate, largest first, the batch plan is walked over every step of the run to collect the shapes
its micro-batches take (rows, longest row), and each shape that no other one contains is run forward and
backward once, eagerly, on copies of the run's longest row; the first candidate whose peak stays under
the ceiling is the one trained with. Sorted micro-batches of short rows hold more rows than the setting,
and the prefix is copied per row, so such a shape can need more memory than `micro x longest` tokens
suggest: that is why shapes are walked, not assumed.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ptune.data import BatchPlan, collate

log = logging.getLogger("ptune.fit")


@dataclass
class Probe:
    micro: int
    accumulation: int
    shape: tuple[int, int]   # (rows, longest row in tokens) of the micro-batch that needed the most memory
    peak_gib: float          # inf: out of memory


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def micro_batch_shapes(plan: BatchPlan, lengths: list[int], steps: int) -> set[tuple[int, int]]:
    """(rows, longest row) of every micro-batch of every rank over `steps` optimizer steps."""
    shapes = set()
    for step in range(steps):
        for rank in range(plan.world_size):
            for mb in plan.micro_batches(step, rank):
                shapes.add((len(mb), max(lengths[r] for r in mb)))
    return shapes


def outermost(shapes: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The shapes no other shape contains (as many rows or more, and rows as long or longer), widest first."""
    return sorted((s for s in shapes if not any(o != s and o[0] >= s[0] and o[1] >= s[1] for o in shapes)),
                  reverse=True)


def peak_gib(loss_fn, params, batch: dict, global_targets: int) -> float:
    """Peak GPU memory of one forward and backward pass of `batch` (inf if it runs out); gradients are cleared."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        loss = loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
        (loss / global_targets).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        peak = math.inf
    loss = None
    for p in params:
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def fit_micro_batch(plan_for: Callable[[int, int], BatchPlan], rows, lengths: list[int], steps: int,
                    per_rank_rows: int, ceiling_gib: float, loss_fn, params, pad_token_id: int,
                    pad_to_multiple_of: int, device: torch.device) -> tuple[Probe, list[Probe]]:
    """The largest micro-batch whose every shape peaks under `ceiling_gib`, and every candidate measured.

    `plan_for(micro, accumulation)` builds the run's batch plan for a split; `rows[i]["input_ids"]` are the
    tokenized rows and `lengths` their token counts. Every position of a probe counts as a target,
    the most the loss can hold. Returns (chosen, probes); chosen.peak_gib > ceiling_gib when even a
    micro-batch of one row does not fit.
    """
    longest = rows[max(range(len(lengths)), key=lengths.__getitem__)]["input_ids"]
    peaks: dict[tuple[int, int], float] = {}
    probes = []
    for micro in divisors_descending(per_rank_rows):
        accumulation = per_rank_rows // micro
        worst = Probe(micro, accumulation, (0, 0), 0.0)
        for shape in outermost(micro_batch_shapes(plan_for(micro, accumulation), lengths, steps)):
            if shape not in peaks:
                n, length = shape
                row = {"input_ids": longest[:length], "labels": longest[:length]}
                batch = collate([row] * n, pad_token_id, pad_to_multiple_of)
                peaks[shape] = peak_gib(loss_fn, params, {k: v.to(device) for k, v in batch.items()},
                                        max(1, n * length))
            if peaks[shape] > worst.peak_gib:
                worst = Probe(micro, accumulation, shape, peaks[shape])
            if worst.peak_gib > ceiling_gib:
                break  # this candidate is out; its other shapes need not be run
        probes.append(worst)
        log.info("micro-batch %d x %d: peak %.2f GiB (%d rows of up to %d tokens)", micro, accumulation,
                 worst.peak_gib, *worst.shape)
        if worst.peak_gib <= ceiling_gib:
            return worst, probes
    return probes[-1], probes
