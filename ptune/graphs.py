"""CUDA graphs for training: each micro-batch shape's forward and backward pass captured once, then replayed.

At small micro-batches a 6B model's step is bound by the CPU, not the GPU: thousands of kernels are
launched one by one from Python and autograd, and each finishes before the next is queued (micro-batch
1 ran at ~8 samples/s where its arithmetic allows several times more). A replayed graph launches them all
at once. Shapes vary with row lengths, so there is one capture per (rows, length), all in one memory
pool (micro-batches run one after another, so their captures can share memory); past `max_shapes`
captures, new shapes run eagerly, which bounds both the capture time and the memory.

Prefix dropout stays what eager mode draws: a replay reads the generator's seed and offset at launch,
and the trainer reseeds before every micro-batch.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ptune.capture import own_cublas_workspace
from ptune.generate import has_sliding_layers
from ptune.step import MicroBatchLoss

log = logging.getLogger("ptune.graphs")

# The first backward pass after a capture finds the prefix's gradient accumulators made on another
# stream (capture runs on a side stream) and warns of a possible extra synchronisation; gradients are
# unaffected (the tests compare them with eager ones) and the warning would only alarm.
warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match", category=UserWarning)


class GraphedMicroBatchLoss:
    """Stands in for `MicroBatchLoss`: same arguments, same loss and prefix gradients, graph-replayed on CUDA."""

    def __init__(self, lm, loss_chunk_size: int, softcap: float | None, max_shapes: int, warmup: int = 2):
        self.lm, self.loss_chunk_size, self.softcap = lm, loss_chunk_size, softcap
        self.eager = MicroBatchLoss(lm, loss_chunk_size, softcap)
        self.max_shapes, self.warmup = max_shapes, warmup
        self.graphed: dict[tuple[int, ...], MicroBatchLoss] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False

    def __call__(self, input_ids, attention_mask, labels) -> torch.Tensor:
        shape = tuple(input_ids.shape)
        fn = self.graphed.get(shape)
        if fn is None and not self.failed and len(self.graphed) < self.max_shapes:
            fn = self._capture(input_ids, attention_mask, labels)
        if fn is None:
            return self.eager(input_ids, attention_mask, labels)
        return fn(input_ids, attention_mask, labels)

    def _capture(self, input_ids, attention_mask, labels):
        fn = MicroBatchLoss(self.lm, self.loss_chunk_size, self.softcap, capturable=True)
        # Warm-up and capture run the pass several times and draw dropout masks; the trainer reseeds the
        # RNG before each micro-batch, so the masks this micro-batch uses are unaffected.
        state = torch.cuda.get_rng_state()
        try:
            # Each capture makes its cuBLAS workspace in the shared pool and nobody keeps it after (the
            # warm-up's, on a new stream each call, goes too): kept, each captured shape held ~64 MiB more
            # and a run grew past the peak its first steps showed. A later capture may reuse that memory,
            # which is safe because micro-batches replay one at a time, forward then backward, and a
            # graph's scratch space holds nothing between its replays.
            with own_cublas_workspace():
                fn = torch.cuda.make_graphed_callables(fn, (input_ids.clone(), attention_mask.clone(),
                                                            labels.clone()),
                                                       num_warmup_iters=self.warmup, pool=self.pool)
        except Exception as e:  # noqa: BLE001 -- a model that cannot be captured still trains, only slower
            log.warning("training without CUDA graphs: capturing a micro-batch of shape %s failed (%s: %s)",
                        tuple(input_ids.shape), type(e).__name__, e)
            self.failed = True
            return None
        finally:
            torch.cuda.set_rng_state(state)
        self.graphed[tuple(input_ids.shape)] = fn
        log.info("captured the forward and backward pass for micro-batches of shape %s (%d of at most %d)",
                 tuple(input_ids.shape), len(self.graphed), self.max_shapes)
        return fn


def micro_batch_loss(lm, loss_chunk_size: int, softcap: float | None, *, cuda_graphs: bool, max_shapes: int):
    """The trainer's micro-batch loss: graph-replayed where that works, eager otherwise."""
    eager = MicroBatchLoss(lm, loss_chunk_size, softcap)
    if not cuda_graphs or next(lm.prefix.parameters()).device.type != "cuda":
        return eager
    if has_sliding_layers(lm.base):
        log.info("trainer.cuda_graphs: off for this model (sliding-window layers build masks per length)")
        return eager
    return GraphedMicroBatchLoss(lm, loss_chunk_size, softcap, max_shapes)
