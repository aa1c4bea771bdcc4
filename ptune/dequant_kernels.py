"""Triton kernels that widen the quantized base's weights on CUDA, one pass each.

Plain PyTorch widens an int4 weight in four passes over full-size temporaries (unpack, convert, scale,
offset); torch.compile fuses them, but its kernel reached only 0.4-1.1 TB/s on the ChatGLM2-6B layer
shapes. These read each packed byte once and write the weight once, at 2.1-2.7 TB/s on the large shapes
(one H100: 6 ms to widen the whole int4 6B base against 77 ms eager, BENCHMARKS.md run 14). The layout
they read is :mod:`ptune.quant`'s; :func:`ptune.quant.dequantize` is the reference they are tested
against. Importing this module needs triton, which CUDA builds of PyTorch bring.

For a handful of rows (decoding a few sequences) widening is the wrong trade: the layer's matmul then
reads the weight at 2 bytes a value after the widening wrote it, where the stored codes are 0.5 (int4) or
1 (int8). :func:`small_matmul` reads the stored codes and widens them tile by tile in registers, one tile
of output columns per program, so the weight crosses memory once, at its stored size.
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


@triton.jit
def _int4_matmul_kernel(x_ptr, packed_ptr, scale_ptr, offset_ptr, out_ptr, M, N, K, GROUPS, stride_x, stride_out,
                        HALF: tl.constexpr, GROUPS_A_STEP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    # Each tile of codes is widened in registers exactly as _int4_kernel widens it, so the product is
    # the widened weight's, only never written out. Tiles are (columns, groups, half-group): one scale
    # and offset load per group, broadcast over its codes.
    m = tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, HALF)
    keep_m, keep_n = m < M, n < N
    row = n.to(tl.int64) * (GROUPS * HALF)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(0, GROUPS, GROUPS_A_STEP):
        group = first + tl.arange(0, GROUPS_A_STEP)
        keep_w = keep_n[:, None] & (group < GROUPS)[None, :]
        codes = tl.load(packed_ptr + row[:, None, None] + (group[:, None] * HALF + k[None, :])[None, :, :],
                        mask=keep_w[:, :, None], other=0)
        scale = tl.load(scale_ptr + n[:, None] * GROUPS + group[None, :], mask=keep_w, other=0.0)[:, :, None]
        offset = tl.load(offset_ptr + n[:, None] * GROUPS + group[None, :], mask=keep_w, other=0.0)[:, :, None]
        low = group[:, None] * (2 * HALF) + k[None, :]  # input columns of the low nibbles; high ones HALF on
        x_ptrs = x_ptr + m[:, None, None] * stride_x + low[None, :, :]
        x_low = tl.load(x_ptrs, mask=keep_m[:, None, None] & (low < K)[None, :, :], other=0.0)
        x_high = tl.load(x_ptrs + HALF, mask=keep_m[:, None, None] & (low + HALF < K)[None, :, :], other=0.0)
        w_low = ((codes & 15).to(tl.float32) * scale + offset).to(x_low.dtype)
        w_high = ((codes >> 4).to(tl.float32) * scale + offset).to(x_low.dtype)
        width: tl.constexpr = GROUPS_A_STEP * HALF
        acc = tl.dot(tl.reshape(x_low, (BLOCK_M, width)), tl.trans(tl.reshape(w_low, (BLOCK_N, width))), acc)
        acc = tl.dot(tl.reshape(x_high, (BLOCK_M, width)), tl.trans(tl.reshape(w_high, (BLOCK_N, width))), acc)
    tl.store(out_ptr + m[:, None] * stride_out + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=keep_m[:, None] & keep_n[None, :])


@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, M, N, K, stride_x, stride_out,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep_m, keep_n = m < M, n < N
    row = n.to(tl.int64) * K
    scale = tl.load(scale_ptr + n, mask=keep_n, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        keep_k = k < K
        q = tl.load(q_ptr + row[:, None] + k[None, :], mask=keep_n[:, None] & keep_k[None, :], other=0)
        x = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=keep_m[:, None] & keep_k[None, :], other=0.0)
        w = (q.to(tl.float32) * scale[:, None]).to(x.dtype)  # as _int8_kernel widens it
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(out_ptr + m[:, None] * stride_out + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=keep_m[:, None] & keep_n[None, :])


# The row count up to which small_matmul serves a layer: tl.dot's smallest tile is 16 rows, and past it
# the widened weight's matmul is compute-bound enough to pay for the widening.
SMALL_ROWS = 16
# Tile and launch shape: output columns a program, codes a step (int4: bytes), warps, pipeline stages.
SMALL_TILE = {"int4": (64, 256, 4, 2), "int8": (32, 256, 4, 4)}


def small_matmul_fits(x: torch.Tensor, group_size: int) -> bool:
    """Whether :func:`small_matmul` serves this input: at most SMALL_ROWS rows, of bf16 or fp16 (fp32 would
    go through the tensor cores as tf32), and for int4 (`group_size` > 0) groups of a power of two."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.numel() // max(x.shape[-1], 1) > SMALL_ROWS:
        return False
    return group_size & (group_size - 1) == 0


def small_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 in_features: int) -> torch.Tensor:
    """x @ W^T for the quantized W (:mod:`ptune.quant`'s layout), widening W tile by tile in registers
    rather than in memory; `x` is 2-D with at most SMALL_ROWS rows (see :func:`small_matmul_fits`)."""
    x = x.contiguous()
    rows, out_features = x.shape[0], qweight.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = SMALL_TILE["int8" if offset is None else "int4"]
    grid = (triton.cdiv(out_features, block_n),)
    launch = {"BLOCK_M": SMALL_ROWS, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}
    if offset is None:
        _int8_matmul_kernel[grid](x, qweight, scale, out, rows, out_features, in_features, x.stride(0), out.stride(0),
                                  **launch)
    else:
        groups, half = scale.shape[1], qweight.shape[1] // scale.shape[1]
        del launch["BLOCK_K"]  # whole groups a step, at least 16 codes (tl.dot's smallest inner size)
        _int4_matmul_kernel[grid](x, qweight, scale, offset, out, rows, out_features, in_features, groups, x.stride(0),
                                  out.stride(0), HALF=half, GROUPS_A_STEP=max(1, block_k // half, 16 // half),
                                  **launch)
    return out


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
