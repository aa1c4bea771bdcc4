"""Triton kernels for the element-wise work around a decoder layer's matrix multiplies (CUDA only).

Eager PyTorch runs an RMSNorm as six kernels over float32 copies of the activations, a SiLU gate as
three, and rotary embedding as a dozen strided copies, multiplies and concatenations, each of them again
in the backward pass; on a ChatGLM2-6B-shaped model at micro-batch 16 they took ~80 ms of a 190 ms step
whose matrix multiplies take 95 (BENCHMARKS.md run 18). Each kernel here reads its inputs once and
writes its outputs once.

The forward kernels round where eager PyTorch rounds (every bf16/fp16 op result), so their outputs are
eager's up to the order of the norm's sum of squares; the backward kernels compute in float32 and round
once. :mod:`ptune.layers` wraps them as autograd functions. Importing this module needs triton, which
CUDA builds of PyTorch bring.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, n, inv_n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=keep, other=0.0).to(tl.float32)
    rstd = libdevice.rsqrt(tl.sum(x * x, axis=0) * inv_n + eps)
    h = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # eager rounds to the input dtype here
    w = tl.load(w_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + cols, (w * h).to(y_ptr.dtype.element_ty), mask=keep)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dy_stride, x_stride, dx_stride, n, inv_n,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < n
    dy = tl.load(dy_ptr + row * dy_stride + cols, mask=keep, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * x_stride + cols, mask=keep, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    g = (dy * w).to(dx_ptr.dtype.element_ty).to(tl.float32)
    dot = tl.sum(g * x, axis=0) * inv_n
    dx = rstd * g - x * (rstd * rstd * rstd * dot)
    tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=keep)


@triton.jit
def silu_mul_fwd(g_ptr, u_ptr, o_ptr, g_stride, u_stride, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < n
    a = tl.load(g_ptr + row * g_stride + cols, mask=keep, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=keep, other=0.0).to(tl.float32)
    s = (a / (1.0 + libdevice.exp(-a))).to(o_ptr.dtype.element_ty).to(tl.float32)
    tl.store(o_ptr + row * n + cols, (u * s).to(o_ptr.dtype.element_ty), mask=keep)


@triton.jit
def silu_mul_bwd(do_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, g_stride, u_stride, dg_stride, du_stride, n,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < n
    do = tl.load(do_ptr + row * n + cols, mask=keep, other=0.0).to(tl.float32)
    a = tl.load(g_ptr + row * g_stride + cols, mask=keep, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=keep, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + libdevice.exp(-a))
    s = (a * sig).to(dg_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + row * du_stride + cols, (do * s).to(du_ptr.dtype.element_ty), mask=keep)
    dg = do * u * sig * (1.0 + a * (1.0 - sig))
    tl.store(dg_ptr + row * dg_stride + cols, dg.to(dg_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _bf16_round(v):
    # Round-to-nearest-even to bf16, kept in float32. A cast there and back would say the same, but the
    # compiler may drop the pair and fuse the multiply into the add, which eager PyTorch never does.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rotary(x_ptr, cos_ptr, sin_ptr, y_ptr, seq, heads, sx_b, sx_t, sx_h, sc_b, sc_t, sy_b, sy_t, sy_h,
           ROT: tl.constexpr, DIM: tl.constexpr, HEADS: tl.constexpr, INTERLEAVED: tl.constexpr,
           BACKWARD: tl.constexpr):
    """One token's heads. Forward: y = x*cos + rotate(x)*sin, rounded like eager; backward: the transpose.

    Features pair up as (2i, 2i+1) when INTERLEAVED (GLM) or as (i, i + DIM/2) (Llama); pair i turns by
    the angle of cos[i], sin[i]. Only the first ROT features rotate (ChatGLM2 rotates half of each head).
    The row is loaded whole and split into its pairs in registers: loading each feature's partner from
    memory made the kernel gather two bytes at a time.
    """
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // seq, pid % seq
    h = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, DIM)[None, :]
    keep = (h < heads) & (d < DIM)
    x = tl.load(x_ptr + b * sx_b + t * sx_t + h * sx_h + d, mask=keep, other=0.0).to(tl.float32)
    i = tl.arange(0, DIM // 2)[None, :]
    turns = i < ROT // 2
    c = tl.load(cos_ptr + b * sc_b + t * sc_t + i, mask=turns, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + b * sc_b + t * sc_t + i, mask=turns, other=0.0).to(tl.float32)
    if INTERLEAVED:
        x1, x2 = tl.split(tl.reshape(x, (HEADS, DIM // 2, 2)))
    else:
        x1, x2 = tl.split(tl.permute(tl.reshape(x, (HEADS, 2, DIM // 2)), (0, 2, 1)))
    out_ty = y_ptr.dtype.element_ty
    if BACKWARD:
        y1 = x1 * c + x2 * s
        y2 = x2 * c - x1 * s
    elif out_ty == tl.bfloat16:
        y1 = _bf16_round(x1 * c) + _bf16_round(-x2 * s)
        y2 = _bf16_round(x2 * c) + _bf16_round(x1 * s)
    else:  # launched without multiply-add fusion, so float32 rounds each product like eager
        y1 = (x1 * c).to(out_ty).to(tl.float32) + (-x2 * s).to(out_ty).to(tl.float32)
        y2 = (x2 * c).to(out_ty).to(tl.float32) + (x1 * s).to(out_ty).to(tl.float32)
    if INTERLEAVED:
        y = tl.reshape(tl.join(y1, y2), (HEADS, DIM))
    else:
        y = tl.reshape(tl.permute(tl.join(y1, y2), (0, 2, 1)), (HEADS, DIM))
    tl.store(y_ptr + b * sy_b + t * sy_t + h * sy_h + d, y.to(out_ty), mask=keep)
