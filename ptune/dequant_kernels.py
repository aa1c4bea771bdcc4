"""Triton kernels that widen the quantized base's weights on CUDA, one pass each.

Plain PyTorch widens an int4 weight in four passes over full-size temporaries (unpack, convert, scale,
offset); torch.compile fuses them, but its kernel reached only 0.4-1.1 TB/s on the ChatGLM2-6B layer
shapes. These read each packed byte once and write the weight once, at 2.1-2.7 TB/s on the large shapes
(one H100: 6 ms to widen the whole int4 6B base against 77 ms eager, BENCHMARKS.md run 14). The layout
they read is :mod:`ptune.quant`'s; :func:`ptune.quant.dequantize` is the reference they are tested
against. Importing this module needs triton, which CUDA builds of PyTorch bring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _int4_kernel(packed_ptr, scale_ptr, offset_ptr, out_ptr, n_bytes, HALF: tl.constexpr, BLOCK: tl.constexpr):
    # Byte k of a group holds the group's codes k (low nibble) and k + HALF (high nibble), so both halves
    # are written as contiguous runs.
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = byte < n_bytes
    codes = tl.load(packed_ptr + byte, mask=keep, other=0)
    group = byte // HALF  # row * groups_per_row + group in row: the scale's flat index
    scale = tl.load(scale_ptr + group, mask=keep, other=0.0)
    offset = tl.load(offset_ptr + group, mask=keep, other=0.0)
    low = (codes & 15).to(tl.float32) * scale + offset
    high = (codes >> 4).to(tl.float32) * scale + offset
    first = group * (2 * HALF) + byte % HALF
    tl.store(out_ptr + first, low.to(out_ptr.dtype.element_ty), mask=keep)
    tl.store(out_ptr + first + HALF, high.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _int8_kernel(q_ptr, scale_ptr, out_ptr, n, COLS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = i < n
    q = tl.load(q_ptr + i, mask=keep, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + i // COLS, mask=keep, other=0.0)
    tl.store(out_ptr + i, (q * scale).to(out_ptr.dtype.element_ty), mask=keep)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, in_features: int,
               group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`ptune.quant.dequantize` for contiguous CUDA tensors."""
    rows = qweight.shape[0]
    if offset is None:
        out = torch.empty(rows, in_features, dtype=dtype, device=qweight.device)
        n = qweight.numel()
        _int8_kernel[(triton.cdiv(n, _BLOCK),)](qweight, scale, out, n, COLS=in_features, BLOCK=_BLOCK)
        return out
    out = torch.empty(rows, 2 * qweight.shape[1], dtype=dtype, device=qweight.device)
    n = qweight.numel()
    _int4_kernel[(triton.cdiv(n, _BLOCK),)](qweight, scale, offset, out, n, HALF=group_size // 2, BLOCK=_BLOCK)
    return out if out.shape[1] == in_features else out[:, :in_features]
