"""A Triton kernel for one decoding step's attention with a prefix shared by every row (CUDA only).

While decoding a batch, each row's new query reads its own cached keys/values and the same prefix. SDPA
needs the prefix copied in front of every row's cache and reads it once per row; at batch 1070 on a
ChatGLM2-6B shape that was 40% of each step's attention reads, and with a static cache a row's empty
slots were read too (a mask only hides them). Here one program per (row, key/value head) takes all the
query heads of its group at once, reads the prefix from the one copy (which stays in L2), and skips
blocks of its cache that the mask hides entirely: the not-yet-written tail and left padding.

Softmax runs online in float32 (the running maximum and sum of each query head), like flash attention;
a hidden slot adds exactly zero, so a block past the end changes nothing, and a static cache gives the
same bits as a growing one. Importing this module needs triton, which CUDA builds of PyTorch bring.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attend(q, k, v, seen, m, s_sum, acc, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units: exp2 below
    s = tl.where(seen[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    s_sum = s_sum * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, s_sum, acc


# Triton compiles a variant per class of integer argument (1, a multiple of 16, other); the lengths and
# the mask's row stride change with every prompt and max_new_tokens, and a new class recompiled the kernel
# inside a generation (~1 s; seen as a 2-token warm-up not warming a 128-token run). Their divisibility buys
# nothing here: the mask is read a byte at a time and the loops are masked anyway.
@triton.jit(do_not_specialize=["m_sb", "kv_len", "prefix_len"])
def decode_attention(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, out_ptr, qk_scale,
                     q_sb, q_sh, k_sb, k_sh, k_st, v_sb, v_sh, v_st, pk_sh, pk_st, pv_sh, pv_st, m_sb, o_sb, o_sh,
                     kv_len, prefix_len,
                     GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                     MASK_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM)
    n = tl.arange(0, BLOCK)
    live = g < GROUP
    q_heads = head * GROUP + g
    q = tl.load(q_ptr + row * q_sb + q_heads[:, None] * q_sh + d[None, :], mask=live[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
    for start in range(0, prefix_len, BLOCK):
        slots = start + n
        seen = slots < prefix_len
        k = tl.load(pk_ptr + head * pk_sh + slots[:, None] * pk_st + d[None, :], mask=seen[:, None], other=0.0)
        v = tl.load(pv_ptr + head * pv_sh + slots[:, None] * pv_st + d[None, :], mask=seen[:, None], other=0.0)
        m, s_sum, acc = _attend(q, k, v, seen, m, s_sum, acc, qk_scale)
    # The span of slots the mask shows (a byte a slot, cheap to scan): only its blocks are read.
    first, last = kv_len, -1
    for start in range(0, kv_len, MASK_BLOCK):
        slots = start + tl.arange(0, MASK_BLOCK)
        shown = (tl.load(mask_ptr + row * m_sb + slots, mask=slots < kv_len, other=0) != 0) & (slots < kv_len)
        first = tl.minimum(first, tl.min(tl.where(shown, slots, kv_len), 0))
        last = tl.maximum(last, tl.max(tl.where(shown, slots, -1), 0))
    k_row = k_ptr + row * k_sb + head * k_sh
    v_row = v_ptr + row * v_sb + head * v_sh
    for start in range((first // BLOCK) * BLOCK, last + 1, BLOCK):
        slots = start + n
        seen = (tl.load(mask_ptr + row * m_sb + slots, mask=slots < kv_len, other=0) != 0) & (slots < kv_len)
        k = tl.load(k_row + slots[:, None] * k_st + d[None, :], mask=seen[:, None], other=0.0)
        v = tl.load(v_row + slots[:, None] * v_st + d[None, :], mask=seen[:, None], other=0.0)
        m, s_sum, acc = _attend(q, k, v, seen, m, s_sum, acc, qk_scale)
    out = acc / s_sum[:, None]
    tl.store(out_ptr + row * o_sb + q_heads[:, None] * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=live[:, None])
