"""The P-Tuning v2 prefix: a trainable encoder and the way its keys/values reach every attention layer.

The prefix never goes through the model's KV cache. transformers drops the cache under gradient
checkpointing (and its rotary code would rotate cached prefix keys by real-token positions), which is
why PEFT's prefix tuning breaks there. Instead every attention call of the base model goes through a
thin wrapper, registered as an attention implementation, that prepends this layer's prefix keys and
values *after* rotary embedding, so the prefix carries no position and real tokens start at 0, exactly
as ChatGLM2's own P-tuning does. The per-layer tensors travel as a keyword argument of the model's
forward, which transformers hands down to the attention function unchanged; gradient checkpointing
(non-reentrant) recomputes through it like through any other input.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX_KWARG = "ptune_prefix"
_WRAPPED_PREFIX = "ptune_"


@dataclass(frozen=True)
class PrefixSpec:
    """Everything needed to rebuild a prefix encoder and to check that it fits a base model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    length: int
    projection: bool = False
    projection_hidden_size: int | None = None

    @property
    def kv_size(self) -> int:
        # One virtual token's keys and values for all layers, laid out layer-major, then key/value,
        # then head, then dim -- the layout ChatGLM2's own prefix encoder uses, so its checkpoints load.
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def for_model(cls, config, length: int, projection: bool = False, projection_hidden_size: int | None = None):
        shape = attention_shape(config)
        if projection and projection_hidden_size is None:
            projection_hidden_size = shape["hidden_size"]
        return cls(
            num_layers=shape["num_layers"],
            num_kv_heads=shape["num_kv_heads"],
            head_dim=shape["head_dim"],
            length=length,
            projection=projection,
            projection_hidden_size=projection_hidden_size if projection else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def attention_shape(config) -> dict:
    """Layer count and key/value head shape of a transformers model config (multi-query, grouped or multi-head)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": config.hidden_size,
    }


class PrefixEncoder(nn.Module):
    """`length` virtual tokens turned into per-layer keys and values.

    Without projection the keys/values are the embedding itself; with projection a two-layer tanh MLP
    maps the embedding to them (reparameterisation that makes optimisation steadier on small data).
    Parameter names (`embedding.weight`, `trans.0.*`, `trans.2.*`) follow ChatGLM2's encoder so that its
    checkpoints map onto this one by a name prefix.
    """

    def __init__(self, spec: PrefixSpec, dropout: float = 0.0):
        super().__init__()
        self.spec = spec
        self.embedding = nn.Embedding(spec.length, spec.kv_size)
        if spec.projection:
            hidden = spec.projection_hidden_size
            self.trans = nn.Sequential(nn.Linear(spec.kv_size, hidden), nn.Tanh(), nn.Linear(hidden, spec.kv_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch_size: int = 1) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per layer `(key, value)`, each `(batch, kv_heads, length, head_dim)`.

        Outside training the batch dimension is 1 and the attention wrapper broadcasts it, so one
        encoder call serves any batch (beam search included). In training each row gets its own dropout
        mask, as in the reference, so the batch is materialised.
        """
        s = self.spec
        flat = self.embedding.weight
        if s.projection:
            flat = self.trans(flat)
        rows = batch_size if (self.training and self.dropout.p > 0) else 1
        flat = self.dropout(flat.unsqueeze(0).expand(rows, -1, -1))
        kv = flat.view(rows, s.length, s.num_layers * 2, s.num_kv_heads, s.head_dim).permute(2, 0, 3, 1, 4)
        # unbind, not kv[i] per layer: the backward pass of each index writes a zero-filled copy of the whole
        # prefix and adds it up (56 of them for ChatGLM2-6B, ~6 ms a micro-batch of 16); unbind's is one stack.
        parts = kv.unbind(0)
        return tuple((parts[2 * i], parts[2 * i + 1]) for i in range(s.num_layers))


def attention_function(name: str, module: nn.Module):
    """The attention function transformers registers under `name`, for `module`'s model family."""
    if name == "eager":
        # transformers keeps each family's eager attention in its modeling file, not in the registry.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _prefixed_mask(mask, batch: int, q_len: int, kv_len: int, prefix_len: int, device) -> torch.Tensor:
    """The attention mask with `prefix_len` always-visible columns in front.

    A missing mask means "causal, no padding" (SDPA skips building it); the causal part is then aligned
    bottom-right so it also holds when cached tokens precede the queries during generation.
    """
    if mask is None:
        q = torch.arange(q_len, device=device).unsqueeze(1)
        k = torch.arange(kv_len, device=device).unsqueeze(0)
        mask = (k <= q + (kv_len - q_len)).view(1, 1, q_len, kv_len)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"prefix attention supports tensor masks only, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        visible = torch.ones((*mask.shape[:-1], prefix_len), dtype=torch.bool, device=mask.device)
    else:  # additive float mask: 0 means visible
        visible = torch.zeros((*mask.shape[:-1], prefix_len), dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask[..., :kv_len]], dim=-1)


_MEMO: list = [None]  # (weak reference to the source mask, its version and the derivation's key, derived mask)


def _memoised(source, key: tuple, build):
    """`build()`, reused while `source` is the same unchanged tensor, and dropped when `source` is.

    transformers hands every layer of one forward pass the same mask object, so what SDPA needs from it
    (prefix columns, the query groups folded in, the additive form) is built by the first layer only;
    per layer it cost a cat, a copy and a where (~2.5 ms a micro-batch of 16 on ChatGLM2-6B's shape).
    The version counter catches the decoder's in-place mask updates. Holding the source only weakly frees
    the derived mask with it: a generation's prefill mask (0.7 GB at batch 1070) is gone once the prefill
    is, instead of staying through every decoding step.
    """
    if not isinstance(source, torch.Tensor) or torch.compiler.is_compiling():
        return build()
    tag = (source._version, key)
    hit = _MEMO[0]
    if hit is not None and hit[0]() is source and hit[1] == tag:
        return hit[2]
    out = build()

    def forget(ref):
        if _MEMO[0] is not None and _MEMO[0][0] is ref:
            _MEMO[0] = None

    _MEMO[0] = (weakref.ref(source, forget), tag, out)
    return out


def _sdpa_mask(mask: torch.Tensor, groups: int, q_len: int, dtype) -> torch.Tensor:
    """A boolean (batch, 1, q_len, kv) mask for queries folded as (batch, kv_heads, groups * q_len)."""
    if groups > 1:
        mask = mask.unsqueeze(2).expand(mask.shape[0], mask.shape[1], groups, q_len, mask.shape[-1])
        mask = mask.reshape(mask.shape[0], mask.shape[1], groups * q_len, mask.shape[-1])
    if mask.is_cuda:  # the additive form SDPA would convert a boolean mask to, on every call
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))
    return mask


def grouped_sdpa(module, query, key, value, mask, scaling=None, dropout=0.0, **_):
    """SDPA with an explicit mask for grouped/multi-query attention, without copying keys/values per head.

    With a mask, transformers repeats every key/value head for each of its query heads (SDPA's own GQA
    support needs mask-free calls); for ChatGLM2's 16 query heads per key/value head that is 16x the
    cache read at every decoding step. Folding each group's query heads into the query-length axis lets
    all of them attend to the one shared key/value head instead: the same numbers, no copies. `mask`
    comes from `_sdpa_mask`.
    """
    b, hq, t, d = query.shape
    hk = key.shape[1]
    query = query.reshape(b, hk, (hq // hk) * t, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling)
    # reshape, not view: SDPA may return a non-contiguous tensor (seen with fp32 on CUDA).
    return out.reshape(b, hq, t, d).transpose(1, 2).contiguous(), None


def _shared_decode_fits(query, prefix_key, mask, dropout) -> bool:
    """Whether `shared_prefix_decode` takes this step: one new token, one prefix for all rows (outside
    training), no mask or a boolean one per row, and not under torch.compile (which keeps SDPA)."""
    return (query.shape[2] == 1 and prefix_key.shape[0] == 1 and not dropout and not torch.compiler.is_compiling()
            and (mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
                                  and mask.shape[1] == 1 and mask.shape[2] == 1)))


def _triton_decode_fits(query, key) -> bool:
    d = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and key.dtype == query.dtype
            and d >= 16 and d & (d - 1) == 0)


def shared_prefix_decode(query, key, value, prefix_key, prefix_value, mask, scaling=None) -> torch.Tensor:
    """One decoding step's attention, (batch, 1, heads, dim), with the prefix read from one copy for all rows.

    `query` is (batch, heads, 1, dim); `key`/`value` the cache, (batch, kv_heads, length, dim); the
    prefix (1, kv_heads, prefix_length, dim), never copied in front of each row's cache; `mask` None or
    boolean (batch or 1, 1, 1, >= length), True where a cache slot may be seen. Half precision on CUDA
    runs :mod:`ptune.attention_kernels`; elsewhere the same attention in PyTorch, scores in float32.
    """
    b, hq, _, d = query.shape
    hk, kv_len, plen = key.shape[1], key.shape[2], prefix_key.shape[2]
    group = hq // hk
    scale = d ** -0.5 if scaling is None else scaling
    prefix_key, prefix_value = prefix_key.to(key.dtype), prefix_value.to(value.dtype)
    # No mask shows every slot: one row of ones for all (stride 0).
    rows = mask[:, 0, 0, :kv_len] if mask is not None else torch.ones((1, kv_len), dtype=torch.bool, device=key.device)
    if not _triton_decode_fits(query, key):
        # float32 throughout, as SDPA computes (a no-op for float32 models, the CPU's usual case)
        q = query.reshape(b, hk, group, d).float()
        scores = torch.cat([q @ prefix_key.float().transpose(-1, -2), q @ key.float().transpose(-1, -2)], -1)
        shown = torch.cat([rows.new_ones((1, plen)).expand(rows.shape[0], -1), rows], -1)
        p = torch.softmax((scores * scale).masked_fill(~shown[:, None, None, :], float("-inf")), -1)
        out = p[..., :plen] @ prefix_value.float() + p[..., plen:] @ value.float()
        return out.to(query.dtype).reshape(b, 1, hq, d)
    from ptune import attention_kernels

    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    row_stride = rows.stride(0) if rows.shape[0] > 1 else 0
    out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
    attention_kernels.decode_attention[(b, hk)](
        query, key, value, prefix_key, prefix_value, rows, out, scale * 1.4426950408889634,  # exp2 in the kernel
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), prefix_key.stride(1), prefix_key.stride(2),
        prefix_value.stride(1), prefix_value.stride(2), row_stride, out.stride(0), out.stride(2), kv_len, plen,
        GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()), DIM=d, BLOCK=64, MASK_BLOCK=256,
        num_warps=4, num_stages=3)
    return out


def _prepend(prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(1 or batch, heads, prefix_length, dim) in front of every row of `x`, (batch, heads, length, dim)."""
    prefix = prefix.expand(x.shape[0], -1, -1, -1)
    if prefix.requires_grad or x.requires_grad:
        return torch.cat([prefix, x], 2)  # its backward pass is two views, where the copies' would clone
    # torch.cat gathers a broadcast prefix two bytes at a time; two copies run at copy speed (half the time)
    out = x.new_empty((x.shape[0], x.shape[1], prefix.shape[2] + x.shape[2], x.shape[3]))
    out[:, :, :prefix.shape[2]].copy_(prefix)
    out[:, :, prefix.shape[2]:].copy_(x)
    return out


def _make_prefixed_attention(inner_name: str):
    def prefixed_attention(module, query, key, value, attention_mask, **kwargs):
        prefix = kwargs.pop(PREFIX_KWARG, None)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.shape[-1] < key.shape[2]:
            # A mask narrower than the cache: the static decoder's prefill, whose slots past the prompt are
            # not written yet. Attending over them only to mask them out cost 40% more keys at batch 1070.
            key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
        # Soft-capped or biased attention (Gemma-2, ...) needs the family's own kernel.
        plain = inner_name == "sdpa" and not kwargs.get("softcap") and kwargs.get("position_bias") is None
        groups, q_len = query.shape[1] // key.shape[1], query.shape[2]
        scaling, dropout = kwargs.get("scaling"), kwargs.get("dropout", 0.0)
        if prefix is None:
            if plain and isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
                mask = _memoised(attention_mask, ("plain", groups, q_len, query.dtype),
                                 lambda: _sdpa_mask(attention_mask, groups, q_len, query.dtype))
                return grouped_sdpa(module, query, key, value, mask, scaling, dropout)
            return attention_function(inner_name, module)(module, query, key, value, attention_mask, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise RuntimeError(f"{type(module).__name__} has no layer_idx; ptune cannot route the prefix to it")
        pk, pv = prefix[layer]
        if plain and _shared_decode_fits(query, pk, attention_mask, dropout):
            return shared_prefix_decode(query, key, value, pk, pv, attention_mask, scaling), None
        batch, kv_len, plen = key.shape[0], key.shape[2], pk.shape[2]
        key, value = _prepend(pk.to(key.dtype), key), _prepend(pv.to(value.dtype), value)
        kwargs.pop("is_causal", None)

        def prefixed():
            return _prefixed_mask(attention_mask, batch, q_len, kv_len, plen, query.device)

        if plain and (attention_mask is None or attention_mask.dtype == torch.bool):
            mask = _memoised(attention_mask, ("prefix", plen, groups, q_len, kv_len, query.dtype),
                             lambda: _sdpa_mask(prefixed(), groups, q_len, query.dtype))
            return grouped_sdpa(module, query, key, value, mask, scaling, dropout)
        return attention_function(inner_name, module)(module, query, key, value, prefixed(), **kwargs)

    return prefixed_attention


def enable_prefix_attention(model) -> None:
    """Route the model's attention through the prefix wrapper of its current implementation (idempotent)."""
    if prefix_attention_enabled(model):
        return
    current = model.config._attn_implementation or "eager"
    if current not in ("eager", "sdpa"):
        raise ValueError(f"prefix attention supports attn_implementation 'sdpa' or 'eager', not {current!r}")
    name = _WRAPPED_PREFIX + current
    ALL_ATTENTION_FUNCTIONS.register(name, _make_prefixed_attention(current))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)


def prefix_attention_enabled(model) -> bool:
    return (model.config._attn_implementation or "").startswith(_WRAPPED_PREFIX)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens from 0 whatever the padding side; padding gets position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PrefixLM(nn.Module):
    """A frozen base model with a trainable prefix in front of every attention layer."""

    def __init__(self, base: nn.Module, prefix: PrefixEncoder):
        super().__init__()
        expected = PrefixSpec.for_model(base.config, prefix.spec.length)
        if (expected.num_layers, expected.num_kv_heads, expected.head_dim) != (
            prefix.spec.num_layers, prefix.spec.num_kv_heads, prefix.spec.head_dim
        ):
            raise ValueError(
                f"prefix shape (layers={prefix.spec.num_layers}, kv_heads={prefix.spec.num_kv_heads}, "
                f"head_dim={prefix.spec.head_dim}) does not fit the base model (layers={expected.num_layers}, "
                f"kv_heads={expected.num_kv_heads}, head_dim={expected.head_dim})"
            )
        enable_prefix_attention(base)
        base.requires_grad_(False)
        self.base = base
        self.prefix = prefix
        self.train(False)

    def train(self, mode: bool = True):
        # The base stays in eval mode: its dropout would add noise to a frozen model for no gain.
        self.training = mode
        self.prefix.train(mode)
        self.base.eval()
        # transformers checkpoints a layer only while that layer is in training mode; flip just the layer
        # wrappers so activation recomputation works while every dropout inside stays off.
        for m in self.base.modules():
            if isinstance(m, GradientCheckpointingLayer):
                m.training = mode and m.gradient_checkpointing
        return self

    def recompute_layers(self, count: int) -> None:
        """Recompute the activations of the first `count` decoder layers in backward instead of keeping
        them (0: none): each one frees its share of activation memory at the cost of running its
        forward pass again. The first rather than the last, because their activations are held the longest."""
        layers = [m for m in self.base.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not 0 <= count <= len(layers):
            raise ValueError(f"cannot recompute {count} layers: the model has {len(layers)} decoder layers")
        if count:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i < count
        elif self.base.is_gradient_checkpointing:
            self.base.gradient_checkpointing_disable()
        self.train(self.training)

    @property
    def recomputed_layers(self) -> int:
        return sum(1 for m in self.base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        kwargs[PREFIX_KWARG] = self.prefix(input_ids.shape[0])
        kwargs.setdefault("use_cache", False)
        return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def decoder(self, input_ids, attention_mask=None, position_ids=None, full_mask: bool = False):
        """Last hidden states only, so the loss can apply the output layer in chunks.

        `full_mask=True` passes the causal-and-padding mask as a 4-D tensor, which transformers uses as
        given; from a 2-D mask it first asks the GPU whether anything is padded, a wait a CUDA graph
        cannot contain. (Sliding-window layers need their own masks: not for those models.)
        """
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        if full_mask:
            t = input_ids.shape[1]
            causal = torch.ones((t, t), dtype=torch.bool, device=input_ids.device).tril()
            attention_mask = causal if attention_mask is None else causal & attention_mask.bool()[:, None, :]
            attention_mask = attention_mask.expand(input_ids.shape[0], t, t).unsqueeze(1)
        body = self.base.get_decoder()
        out = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **{PREFIX_KWARG: self.prefix(input_ids.shape[0])},
        )
        return out.last_hidden_state


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (the loss and the Python loop stay eager).

    Layers rather than the whole model: the prefix travels as a keyword argument the compiled graph
    takes as an input, and identical layers share one compiled graph.
    """
    body = model.get_decoder()
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if layers is None:
        raise ValueError(f"{type(body).__name__}: no decoder layer list to compile")
    for layer in layers:
        layer.compile(dynamic=True)
