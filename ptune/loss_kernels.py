"""Cross-entropy over the vocabulary in two passes of the bf16 logits (CUDA only).

`F.cross_entropy(logits.float())` writes a float32 copy of the logits, a float32 log-softmax, and in the
backward pass a float32 gradient it then casts back: ~2.5 ms of a ChatGLM2-6B micro-batch-16 step (3056
positions x 65024 words). The forward kernel reads each row once (running max and sum of exponentials,
in float32); the backward kernel reads it once more and writes the bf16 gradient, softmax minus the
one-hot target. Importing this module needs triton, which CUDA builds of PyTorch bring.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cross_entropy_fwd(logits_ptr, target_ptr, loss_ptr, lse_ptr, stride, n_cols, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    run_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        # Lanes that have seen nothing yet hold -inf; keep them at a zero sum instead of exp(nan).
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(run_max - new_max))
        run_sum = run_sum * scale + tl.where(new_max == float("-inf"), 0.0, tl.exp(x - new_max))
        run_max = new_max
    top = tl.max(run_max, axis=0)
    lse = top + tl.log(tl.sum(run_sum * tl.exp(run_max - top), axis=0))
    target = tl.load(target_ptr + row)
    keep = target != ignore_index
    picked = tl.load(base + tl.where(keep, target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(keep, lse - picked, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def cross_entropy_bwd(logits_ptr, target_ptr, lse_ptr, grad_ptr, dloss_ptr, stride, grad_stride, n_cols, ignore_index,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    scale = tl.where(target != ignore_index, tl.load(dloss_ptr).to(tl.float32), 0.0)
    lse = tl.load(lse_ptr + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        x = tl.load(logits_ptr + row * stride + c, mask=c < n_cols, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)) * scale
        tl.store(grad_ptr + row * grad_stride + c, g.to(grad_ptr.dtype.element_ty), mask=c < n_cols)
