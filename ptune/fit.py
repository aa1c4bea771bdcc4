"""The largest micro-batch that fits a memory ceiling, measured on the GPU (`trainer.auto_micro_batch_gib`).

A step's rows on one rank (per_device_batch_size x gradient_accumulation_steps) can be cut into
micro-batches of any divisor of that count without changing the step's gradient (the loss is normalised
by the step's target tokens), only its memory and speed; larger micro-batches keep the GPU busier. For
each candidate, largest first, the batch plan is walked over every step of the run to collect the shapes
its micro-batches take (rows, longest row), and each shape that no other one contains is run forward and
backward on copies of the run's longest row, the way training will run it (captured as a CUDA graph when
`trainer.cuda_graphs` is on: a graph's memory pool holds more than the eager pass peaks at); the first
candidate whose peak, plus the optimizer's moments, stays under the ceiling is the one trained with.
Sorted micro-batches of short rows hold more rows than the setting,
and the prefix is copied per row, so such a shape can need more memory than `micro x longest` tokens
suggest: that is why shapes are walked, not assumed.

With `trainer.gradient_checkpointing=auto` the number of decoder layers whose activations are recomputed
is chosen too. For each split, largest first, the fewest layers that bring its peak under the ceiling
are searched for (the peak falls about linearly with them, so an interpolation search needs two or three
probes); the search stops at the first split that fits with none. Each split that fits is then timed on
its widest shape, and the fastest per token is trained with: a large micro-batch that recomputes most
layers can be slower than a smaller one that recomputes few.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ptune.capture import clear_cublas_workspaces
from ptune.data import BatchPlan, collate
from ptune.step import gradient_buffers

log = logging.getLogger("ptune.fit")


@dataclass
class Probe:
    micro: int
    accumulation: int
    shape: tuple[int, int]   # (rows, longest row in tokens) of the micro-batch that needed the most memory
    peak_gib: float          # inf: out of memory
    layers: int = 0          # decoder layers recomputed in backward
    ms_per_ktoken: float | None = None  # auto checkpointing: forward and backward time of the widest shape


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


def release_probe_memory() -> None:
    """Frees what a probe left: its graphs and their memory pool (held through reference cycles), and the
    cuBLAS workspaces of the streams it ran on (ptune.capture.clear_cublas_workspaces). Run between
    probes, while no graph exists that will be replayed again."""
    gc.collect()
    clear_cublas_workspaces()
    torch.cuda.empty_cache()


def peak_gib(loss_fn, params, batch: dict, global_targets: int) -> float:
    """Peak GPU memory of a forward and backward pass of `batch` through a new `loss_fn` (inf if it runs
    out), with the gradient buffers training keeps; they are zeroed after."""
    gradient_buffers(params)
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
        p.grad.zero_()
    return peak


def ms_per_ktoken(loss_fn, params, batch: dict, repeats: int = 3) -> float:
    """Fastest of `repeats` forward and backward passes of `batch` after a first one (which captures the
    graph), in ms per thousand tokens."""
    gradient_buffers(params)
    best = math.inf
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
        torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
    for p in params:
        p.grad.zero_()
    return 1e6 * best / batch["input_ids"].numel()


class Prober:
    """Runs the outermost micro-batch shapes of each split, on copies of the run's longest row, through a
    fresh loss from `new_loss()` each time (so every graph is captured anew and freed after), and remembers
    what each (shape, recomputed layers) peaked at. Peaks include AdamW's two moments of `params`."""

    def __init__(self, plan_for: Callable[[int, int], BatchPlan], rows, lengths: list[int], steps: int,
                 per_rank_rows: int, new_loss: Callable[[], Callable], params, pad_token_id: int,
                 pad_to_multiple_of: int, device: torch.device):
        self.plan_for, self.lengths, self.steps, self.per_rank_rows = plan_for, lengths, steps, per_rank_rows
        self.new_loss, self.params, self.pad, self.pad_to, self.device = (new_loss, params, pad_token_id,
                                                                          pad_to_multiple_of, device)
        self.moments_gib = 2 * sum(p.numel() * p.element_size() for p in params) / 2**30
        self.longest = rows[max(range(len(lengths)), key=lengths.__getitem__)]["input_ids"]
        self.shapes: dict[int, list[tuple[int, int]]] = {}
        self.peaks: dict[tuple[tuple[int, int], int], float] = {}

    def shapes_of(self, micro: int) -> list[tuple[int, int]]:
        if micro not in self.shapes:
            plan = self.plan_for(micro, self.per_rank_rows // micro)
            self.shapes[micro] = outermost(micro_batch_shapes(plan, self.lengths, self.steps))
        return self.shapes[micro]

    def batch(self, shape: tuple[int, int]) -> dict:
        n, length = shape
        row = {"input_ids": self.longest[:length], "labels": self.longest[:length]}
        return {k: v.to(self.device) for k, v in collate([row] * n, self.pad, self.pad_to).items()}

    def worst(self, micro: int, ceiling_gib: float, layers: int = 0) -> Probe:
        """The split's highest peak with `layers` recomputed (already set on the model); stops at the
        first shape over the ceiling, since the split is out."""
        worst = Probe(micro, self.per_rank_rows // micro, (0, 0), 0.0, layers)
        for shape in self.shapes_of(micro):
            key = (shape, layers)
            if key not in self.peaks:
                release_probe_memory()
                peak = peak_gib(self.new_loss(), self.params, self.batch(shape), max(1, shape[0] * shape[1]))
                self.peaks[key] = peak + self.moments_gib
                release_probe_memory()
            if self.peaks[key] > worst.peak_gib:
                worst = Probe(micro, worst.accumulation, shape, self.peaks[key], layers)
            if worst.peak_gib > ceiling_gib:
                break
        log.info("micro-batch %d x %d%s: peak %.2f GiB (%d rows of up to %d tokens)", micro, worst.accumulation,
                 f", {layers} layers recomputed" if layers else "", worst.peak_gib, *worst.shape)
        return worst

    def timed(self, probe: Probe) -> Probe:
        widest = max(self.shapes_of(probe.micro), key=lambda s: s[0] * s[1])
        release_probe_memory()
        probe.ms_per_ktoken = ms_per_ktoken(self.new_loss(), self.params, self.batch(widest))
        release_probe_memory()
        log.info("micro-batch %d x %d, %d layers recomputed: %.2f ms per 1000 tokens", probe.micro,
                 probe.accumulation, probe.layers, probe.ms_per_ktoken)
        return probe


def fit_micro_batch(prober: Prober, ceiling_gib: float, layers: int = 0) -> tuple[Probe, list[Probe]]:
    """The largest micro-batch whose every shape peaks under `ceiling_gib` with `layers` recomputed, and
    every candidate measured; chosen.peak_gib > ceiling_gib when even a micro-batch of one row does not fit."""
    probes = []
    for micro in divisors_descending(prober.per_rank_rows):
        probes.append(prober.worst(micro, ceiling_gib, layers))
        if probes[-1].peak_gib <= ceiling_gib:
            return probes[-1], probes
    return probes[-1], probes


def fewest_layers(prober: Prober, micro: int, ceiling_gib: float, num_layers: int,
                  recompute: Callable[[int], None]) -> tuple[Probe | None, list[Probe]]:
    """The fewest recomputed layers with which `micro` fits (None if even all of them do not), and the probes."""
    recompute(0)
    probes = [prober.worst(micro, ceiling_gib, 0)]
    if probes[0].peak_gib <= ceiling_gib:
        return probes[0], probes
    recompute(num_layers)
    probes.append(prober.worst(micro, ceiling_gib, num_layers))
    if probes[-1].peak_gib > ceiling_gib:
        return None, probes
    known = {0: probes[0], num_layers: probes[1]}
    lo, hi = 0, num_layers  # lo is over the ceiling, hi fits
    while hi - lo > 1:
        a, b = known[lo].peak_gib, known[hi].peak_gib
        guess = lo + math.ceil((hi - lo) * (a - ceiling_gib) / (a - b)) if math.isfinite(a) else (lo + hi) // 2
        k = min(hi - 1, max(lo + 1, guess))
        recompute(k)
        known[k] = prober.worst(micro, ceiling_gib, k)
        probes.append(known[k])
        lo, hi = (lo, k) if known[k].peak_gib <= ceiling_gib else (k, hi)
    return known[hi], probes


def fit_micro_batch_and_recompute(prober: Prober, ceiling_gib: float, num_layers: int,
                                  recompute: Callable[[int], None]) -> tuple[list[Probe], list[Probe]]:
    """Every split that fits with the fewest recomputed layers, timed, down to the first that needs none;
    and every probe. The caller picks the fastest (`fastest`) and sets its layers."""
    candidates, probes = [], []
    for micro in divisors_descending(prober.per_rank_rows):
        found, tried = fewest_layers(prober, micro, ceiling_gib, num_layers, recompute)
        probes += tried
        if found is not None:
            recompute(found.layers)
            candidates.append(prober.timed(found))
            if found.layers == 0:
                break  # smaller splits without recomputation only run slower
    return candidates, probes


def fastest(candidates: list[Probe]) -> Probe | None:
    return min(candidates, key=lambda c: c.ms_per_ktoken, default=None)


def choose_split(prober: Prober, ceiling_gib: float, recompute: int | str, num_layers: int,
                 set_layers: Callable[[int], None], pick: Callable[[list[Probe]], Probe | None] = fastest
                 ) -> tuple[Probe | None, list[Probe], list[Probe]]:
    """(the split to train with, None if nothing fits; every probe; the timed candidates). `recompute` is a
    fixed number of recomputed layers (already set on the model) or "auto"; `pick` chooses among the
    timed candidates (under torchrun, one choice for every rank)."""
    if recompute == "auto":
        candidates, probes = fit_micro_batch_and_recompute(prober, ceiling_gib, num_layers, set_layers)
        return pick(candidates), probes, candidates
    chosen, probes = fit_micro_batch(prober, ceiling_gib, recompute)
    return (chosen if chosen.peak_gib <= ceiling_gib else None), probes, []


def agree_across_ranks(candidates: list[Probe], per_rank_rows: int, num_layers: int,
                       device: torch.device) -> Probe | None:
    """The split and layer count every rank trains with: per split, the most layers any rank needed and the
    summed time, so every rank picks the same fastest one."""
    micros = divisors_descending(per_rank_rows)
    found = {c.micro: c for c in candidates}
    layers = torch.tensor([found[m].layers if m in found else num_layers + 1 for m in micros], device=device)
    times = torch.tensor([found[m].ms_per_ktoken if m in found else math.inf for m in micros], device=device,
                         dtype=torch.float64)
    torch.distributed.all_reduce(layers, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(times)
    agreed = [Probe(m, per_rank_rows // m, found[m].shape if m in found else (0, 0),
                    found[m].peak_gib if m in found else math.nan, int(k), float(ms))
              for m, k, ms in zip(micros, layers.tolist(), times.tolist()) if k <= num_layers and math.isfinite(ms)]
    return fastest(agreed)
