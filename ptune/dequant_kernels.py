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
of output columns per program, so the weight crosses memory once, at its stored size. For int4, layers
with few output tiles (4096 outputs make 32 tiles of 128) also split the input dimension among programs,
so that every multiprocessor reads its share; the fp32 partial sums are added in a fixed order and
rounded once.
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
def _int4_matmul_kernel(x_ptr, packed_ptr, scale_ptr, offset_ptr, bias_ptr, out_ptr, partial_ptr, arrived_ptr, M, N,
                        K, GROUPS, PER_SPLIT, stride_x, HALF: tl.constexpr, WIDTH: tl.constexpr,
                        GROUPS_A_STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Each tile of codes is widened in registers exactly as _int4_kernel widens it, so the product is
    # the widened weight's, only never written out. A step is one group: (columns, half-group) tiles,
    # one scale and offset per column. Program (i, s) takes output columns i and groups
    # [s * PER_SPLIT, (s + 1) * PER_SPLIT). With SPLIT > 1 each writes an fp32 partial sum, and the last
    # of a column tile's programs to finish adds them (see _finish).
    # WIDTH is HALF, or 16 (tl.dot's smallest inner size) for smaller groups, the codes past HALF masked.
    m = tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, WIDTH)
    keep_m, keep_n = m < M, n < N
    row = n.to(tl.int64) * (GROUPS * HALF)
    first = tl.program_id(1) * PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, PER_SPLIT, GROUPS_A_STEP):  # PER_SPLIT is a multiple of GROUPS_A_STEP
        for j in tl.static_range(GROUPS_A_STEP):
            g = first + step + j
            # (g + zeros) < GROUPS rather than a scalar test: Triton's CPU interpreter refuses scalar masks.
            keep_w = keep_n & ((g + tl.zeros([BLOCK_N], tl.int32)) < GROUPS)
            inside = ((g + tl.zeros([WIDTH], tl.int32)) < GROUPS) & (k < HALF)
            codes = tl.load(packed_ptr + row[:, None] + g * HALF + k[None, :],
                            mask=keep_w[:, None] & inside[None, :], other=0)
            scale = tl.load(scale_ptr + n * GROUPS + g, mask=keep_w, other=0.0)[:, None]
            offset = tl.load(offset_ptr + n * GROUPS + g, mask=keep_w, other=0.0)[:, None]
            low = g * (2 * HALF) + k  # input columns of the low nibbles; the high ones are HALF on
            x_ptrs = x_ptr + m[:, None] * stride_x + low[None, :]
            x_low = tl.load(x_ptrs, mask=keep_m[:, None] & ((low < K) & inside)[None, :], other=0.0)
            x_high = tl.load(x_ptrs + HALF, mask=keep_m[:, None] & ((low + HALF < K) & inside)[None, :], other=0.0)
            w_low = ((codes & 15).to(tl.float32) * scale + offset).to(x_low.dtype)
            w_high = ((codes >> 4).to(tl.float32) * scale + offset).to(x_low.dtype)
            acc = tl.dot(x_low, tl.trans(w_low), acc)
            acc = tl.dot(x_high, tl.trans(w_high), acc)
    at = m[:, None] * N + n[None, :]
    mask = keep_m[:, None] & keep_n[None, :]
    if SPLIT == 1:
        _finish(acc, bias_ptr, out_ptr, at, n, keep_n, mask, HAS_BIAS)
    else:
        tl.store(partial_ptr + tl.program_id(1) * M * N + at, acc, mask=mask)
        # A count per column tile (zeroed by the caller) replaces a second kernel for the sum. Every thread's
        # partial is stored before the count goes up (the barrier, then the count's release); the program
        # that brings it to SPLIT sees all of them (acquire) and adds them in split order, so the result does
        # not depend on which program finished first.
        tl.debug_barrier()
        if tl.atomic_add(arrived_ptr + tl.program_id(0), 1, sem="acq_rel") == SPLIT - 1:
            acc = tl.load(partial_ptr + at, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT):
                acc += tl.load(partial_ptr + s * M * N + at, mask=mask, other=0.0, cache_modifier=".cg")
            _finish(acc, bias_ptr, out_ptr, at, n, keep_n, mask, HAS_BIAS)


@triton.jit
def _finish(acc, bias_ptr, out_ptr, at, n, keep_n, mask, HAS_BIAS: tl.constexpr):
    # The bias, rounded to the output's type as F.linear's is, joins the fp32 sum: the output is rounded
    # once, as by cuBLAS's bias epilogue.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=keep_n, other=0.0).to(out_ptr.dtype.element_ty)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, stride_x,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
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
    _finish(acc, bias_ptr, out_ptr, m[:, None] * N + n[None, :], n, keep_n, keep_m[:, None] & keep_n[None, :],
            HAS_BIAS)


# The row count up to which small_matmul serves a layer: tl.dot's smallest tile is 16 rows, and past it
# the widened weight's matmul is compute-bound enough to pay for the widening.
SMALL_ROWS = 16
# Tile and launch shape: output columns a program, int8: codes a step / int4: groups a step, warps,
# pipeline stages (BENCHMARKS.md runs 27 and 29: sweeps over ChatGLM2-6B's four layer shapes).
SMALL_TILE = {"int4": (128, 2, 4, 2), "int8": (32, 256, 4, 4)}
# int4: at least this many programs per streaming multiprocessor, the input dimension split among them
# where the output columns alone give fewer (4096 outputs are 32 tiles of 128, on 132 SMs); at most
# MAX_SPLIT parts, each summed in fp32 before the one rounding.
PROGRAMS_PER_SM = 2
MAX_SPLIT = 8
_sm_count: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


def _splits(sms: int, tiles: int, groups: int, step: int) -> tuple[int, int]:
    """(parts, groups a part) for int4's split of the input dimension; groups a part is a multiple of `step`."""
    want = max(1, min(MAX_SPLIT, PROGRAMS_PER_SM * sms // tiles))
    per = triton.cdiv(triton.cdiv(groups, want), step) * step
    return triton.cdiv(groups, per), per


def small_matmul_fits(x: torch.Tensor, group_size: int) -> bool:
    """Whether :func:`small_matmul` serves this input: at most SMALL_ROWS rows, of bf16 or fp16 (fp32 would
    go through the tensor cores as tf32), and for int4 (`group_size` > 0) groups of a power of two."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.numel() // max(x.shape[-1], 1) > SMALL_ROWS:
        return False
    return group_size & (group_size - 1) == 0


def small_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias for the quantized W (:mod:`ptune.quant`'s layout), widening W tile by tile in
    registers rather than in memory, rounded once; `x` is 2-D with at most SMALL_ROWS rows (see
    :func:`small_matmul_fits`)."""
    x = x.contiguous()
    rows, out_features = x.shape[0], qweight.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    bias_args = dict(bias_ptr=bias if bias is not None else out, HAS_BIAS=bias is not None)
    if offset is None:
        block_n, block_k, warps, stages = SMALL_TILE["int8"]
        _int8_matmul_kernel[(triton.cdiv(out_features, block_n),)](
            x, qweight, scale, out_ptr=out, M=rows, N=out_features, K=in_features, stride_x=x.stride(0),
            BLOCK_M=SMALL_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **bias_args)
        return out
    block_n, step, warps, stages = SMALL_TILE["int4"]
    groups, half = scale.shape[1], qweight.shape[1] // scale.shape[1]
    tiles = triton.cdiv(out_features, block_n)
    parts, per = _splits(_multiprocessors(x.device), tiles, groups, step)
    partial, arrived = out, out
    if parts > 1:
        # Made for each call, not kept between calls: nothing outlives a CUDA graph or a compiled step that
        # made it, and calls on other streams cannot share a count.
        partial = torch.empty(parts, rows, out_features, dtype=torch.float32, device=x.device)
        arrived = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    _int4_matmul_kernel[(tiles, parts)](x, qweight, scale, offset, out_ptr=out, partial_ptr=partial,
                                        arrived_ptr=arrived, M=rows, N=out_features, K=in_features, GROUPS=groups,
                                        PER_SPLIT=per, stride_x=x.stride(0), HALF=half, WIDTH=max(half, 16),
                                        GROUPS_A_STEP=step, BLOCK_M=SMALL_ROWS, BLOCK_N=block_n, SPLIT=parts,
                                        num_warps=warps, num_stages=stages, **bias_args)
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
