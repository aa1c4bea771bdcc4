"""Fused kernels in place of a frozen decoder's element-wise code on CUDA: RMSNorm, SiLU gate, rotary.

`fuse_layers(model)` swaps the forward of each RMSNorm, MLP and attention module of a supported family
(GLM, which ChatGLM2/3 load as, and Llama) for one that calls :mod:`ptune.layer_kernels`, on CUDA
tensors only; on the CPU, under torch.compile (which fuses these itself) or for a family not listed,
the model's own code runs. The attention kernel and the KV cache stay the model's, and so do the
matrix multiplies, except that the query, key and value projections are packed into one. Every ptune
path -- training, the static and the growing generation cache -- goes through the same swapped
modules, so they agree with each other exactly; against the unswapped model they agree up to float32
summation order in the norm (the tests bound it).

Frozen weights are assumed: the backward passes give gradients for the activations only, which is what
P-tuning needs. A module whose weight requires a gradient keeps its own code.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from ptune.prefix import attention_function

_FAMILIES = {
    # family: (RMSNorm class, MLP class, attention class, rotary pairs interleaved, MLP gate/up packed)
    "glm": ("GlmRMSNorm", "GlmMLP", "GlmAttention", True, True),
    "llama": ("LlamaRMSNorm", "LlamaMLP", "LlamaAttention", False, False),
}
_SILU_BLOCK = 1024


def _kernels():
    from ptune import layer_kernels

    return layer_kernels


def _active(x: torch.Tensor) -> bool:
    return x.is_cuda and not torch.compiler.is_compiling()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        k, n = _kernels(), x.shape[-1]
        x2 = x.reshape(-1, n)
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = max(16, 1 << (n - 1).bit_length())
        k.rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n, 1.0 / n, eps,
                                       BLOCK=block, num_warps=8 if block >= 4096 else 4)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.block = x.shape, block
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[1]
        dy2 = dy.reshape(-1, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        _kernels().rms_norm_bwd[(x2.shape[0],)](dy2, x2, weight, rstd, dx, dy2.stride(0), x2.stride(0), dx.stride(0),
                                                n, 1.0 / n, BLOCK=ctx.block, num_warps=8 if ctx.block >= 4096 else 4)
        return dx.view(ctx.shape), None, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up; `packed` means gate and up are the two halves of one tensor's last dimension."""

    @staticmethod
    def forward(ctx, gate, up, packed_source):
        n = gate.shape[-1]
        g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
        out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        grid = (g2.shape[0], _cdiv(n, _SILU_BLOCK))
        _kernels().silu_mul_fwd[grid](g2, u2, out, g2.stride(0), u2.stride(0), n, BLOCK=_SILU_BLOCK)
        ctx.save_for_backward(packed_source if packed_source is not None else g2,
                              u2 if packed_source is None else packed_source)
        ctx.packed, ctx.n, ctx.shape = packed_source is not None, n, gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        n = ctx.n
        do = dout.reshape(-1, n).contiguous()
        if ctx.packed:  # a is the packed (rows, 2n) tensor: one gradient for it, written half by half
            src = a.reshape(-1, 2 * n)
            g2, u2 = src[:, :n], src[:, n:]
            grad = torch.empty(src.shape, dtype=src.dtype, device=src.device)
            dg, du = grad[:, :n], grad[:, n:]
        else:
            g2, u2 = a, b
            dg, du = torch.empty_like(g2), torch.empty_like(u2)
        grid = (do.shape[0], _cdiv(n, _SILU_BLOCK))
        _kernels().silu_mul_bwd[grid](do, g2, u2, dg, du, g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0), n,
                                      BLOCK=_SILU_BLOCK)
        if ctx.packed:
            return None, None, grad.view(*ctx.shape[:-1], 2 * n)
        return dg.view(ctx.shape), du.view(ctx.shape), None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rotary_launch(src, cos, sin, out, interleaved: bool, backward: bool, rot: int):
    """`src` and `out` are (batch, seq, heads, dim)-indexed views (any strides, last dim contiguous)."""
    b, t, h, d = src.shape
    _kernels().rotary[(b * t,)](src, cos, sin, out, t, h, src.stride(0), src.stride(1), src.stride(2),
                                cos.stride(0), cos.stride(1), out.stride(0), out.stride(1), out.stride(2),
                                ROT=rot, DIM=d, HEADS=max(1, 1 << (h - 1).bit_length()), INTERLEAVED=interleaved,
                                BACKWARD=backward, num_warps=4, enable_fp_fusion=backward)


class _Rotary(torch.autograd.Function):
    """(batch, seq, heads, dim) projections in, rotated (batch, heads, seq, dim) contiguous out."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        rot = cos.shape[-1]  # GLM: rotated features; its table's first half holds the pairs' angles
        b, t, h, d = x.shape
        out = torch.empty((b, h, t, d), dtype=x.dtype, device=x.device)
        _rotary_launch(x, cos, sin, out.transpose(1, 2), interleaved, False, rot)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.rot = interleaved, rot
        return out

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        b, h, t, d = dy.shape
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = torch.empty((b, t, h, d), dtype=dy.dtype, device=dy.device)
        _rotary_launch(dy.transpose(1, 2), cos, sin, dx, ctx.interleaved, True, ctx.rot)
        return dx, None, None, None


def _norm_forward(self, hidden_states):
    if not _active(hidden_states) or self.weight.requires_grad:
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _packed_mlp_forward(self, x):
    if not _active(x):
        return type(self).forward(self, x)
    gate_up = self.gate_up_proj(x)
    n = gate_up.shape[-1] // 2
    return self.down_proj(_SiluMul.apply(gate_up[..., :n], gate_up[..., n:], gate_up))


def _mlp_forward(self, x):
    if not _active(x):
        return type(self).forward(self, x)
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x), None))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                       **kwargs):
    d = self.head_dim
    # The kernel wants 2^k features, and the Llama pairing (i, i + d/2) whole heads.
    if (not _active(hidden_states) or position_embeddings is None or d & (d - 1)
            or not (self._ptune_interleaved or position_embeddings[0].shape[-1] == d)):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    b, t, _ = hidden_states.shape
    cos, sin = position_embeddings
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    cos, sin = cos.expand(b, t, -1), sin.expand(b, t, -1)  # one table for all rows: stride 0
    interleaved = self._ptune_interleaved
    packed = getattr(self, "_ptune_qkv_weight", None)
    if packed is not None and packed.data_ptr() == self.q_proj.weight.data_ptr():
        # split, not slicing: its backward pass is one concatenation of the three gradients
        q, k, v = F.linear(hidden_states, packed, self._ptune_qkv_bias).split(self._ptune_qkv_sizes, -1)
    else:  # not packed, or moved since (.to() copies each parameter on its own)
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    query = _Rotary.apply(q.view(b, t, -1, d), cos, sin, interleaved)
    key = _Rotary.apply(k.view(b, t, -1, d), cos, sin, interleaved)
    value = v.view(b, t, -1, d).transpose(1, 2)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    attention = attention_function(self.config._attn_implementation or "eager", self)
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(b, t, -1)), weights


def _pack_qkv(attention) -> None:
    """Give q/k/v projections one weight, each module keeping a view of its rows: one matmul instead of three.

    The key and value projections are narrow (256 outputs for ChatGLM2-6B), and alone they run far below
    the matmul units' rate; at batch 1 each is one more weight read launched on its own. No memory is added:
    the modules' own weights become views of the packed one. Quantized projections are left alone.
    """
    parts = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if hasattr(attention, "_ptune_qkv_weight") or not all(type(p) is torch.nn.Linear for p in parts):
        return
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return
    if len({(p.weight.dtype, p.weight.device) for p in parts}) != 1 or any(p.weight.requires_grad for p in parts):
        return
    sizes = [p.out_features for p in parts]
    weight = torch.cat([p.weight.detach() for p in parts])
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
    for i, p in enumerate(parts):
        p.weight = torch.nn.Parameter(weight.split(sizes)[i], requires_grad=False)
        if bias is not None:
            p.bias = torch.nn.Parameter(bias.split(sizes)[i], requires_grad=False)
    attention.register_buffer("_ptune_qkv_weight", weight, persistent=False)
    attention.register_buffer("_ptune_qkv_bias", bias, persistent=False)
    attention._ptune_qkv_sizes = sizes


def fusible_family(model) -> str | None:
    names = {type(m).__name__ for m in model.modules()}
    for family, (norm, mlp, attention, _, _) in _FAMILIES.items():
        if norm in names or mlp in names or attention in names:
            return family
    return None


def fuse_layers(model, enabled: bool = True) -> int:
    """Swap in (or, `enabled=False`, take out) the fused forwards; returns how many modules changed."""
    family = fusible_family(model)
    if family is None:
        return 0
    norm, mlp, attention, interleaved, packed = _FAMILIES[family]
    config = model.config.get_text_config()
    if getattr(config, "hidden_act", "silu") != "silu":
        mlp = None
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        forward = {norm: _norm_forward, mlp: _packed_mlp_forward if packed else _mlp_forward,
                   attention: _attention_forward}.get(name)
        if forward is None:
            continue
        if enabled:
            module.forward = types.MethodType(forward, module)
            if name == attention:
                module._ptune_interleaved = interleaved
                _pack_qkv(module)
        elif "forward" in module.__dict__:
            del module.forward
        changed += 1
    return changed
