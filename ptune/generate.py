"""Batched generation with a prefix: left-padded prompts, KV cache, per-row stop at EOS.

The prefix keys/values are computed once per batch and written into the KV cache before the prompt,
so decoding pays nothing per step for them; positions are passed explicitly so real tokens still start
at 0. (Training cannot use the cache -- gradient checkpointing drops it -- and goes through the
attention wrapper instead; both give the same attention, which the tests check.) Models with
sliding-window layers would evict the prefix from such a cache, so they keep the wrapper here too.
"""

from __future__ import annotations

import warnings

import torch
from transformers import DynamicCache

from ptune.prefix import PREFIX_KWARG, PrefixLM, position_ids_from_mask

# transformers 5.17 announces a rename of `past_key_values` whose replacement its models do not read
# yet (passing the new name silently drops the cache); keep the working name without the per-call noise.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             eos_token_ids: list[int], pad_token_id: int, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
    """New tokens `(B, n)` for left-padded prompts; rows that finished are filled with `pad_token_id`.

    `model` is a PrefixLM or a bare transformers model. `on_token(tokens)` is called with each new
    column, for streaming.
    """
    base = model.base if isinstance(model, PrefixLM) else model
    cache = DynamicCache(config=base.config)
    extra = {}
    mask = attention_mask
    positions = position_ids_from_mask(mask)
    if isinstance(model, PrefixLM):
        prefix = model.prefix(1)
        layer_types = getattr(base.config.get_text_config(), "layer_types", None) or []
        if any("sliding" in t for t in layer_types):
            extra = {PREFIX_KWARG: prefix}
        else:
            batch, dtype = input_ids.shape[0], next(base.parameters()).dtype
            for layer, (k, v) in enumerate(prefix):
                cache.update(k.to(dtype).expand(batch, -1, -1, -1).contiguous(),
                             v.to(dtype).expand(batch, -1, -1, -1).contiguous(), layer)
            mask = torch.cat([mask.new_ones((batch, prefix[0][0].shape[2])), mask], dim=1)
    eos = torch.tensor(eos_token_ids, device=input_ids.device, dtype=torch.long)
    step_ids = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = []
    for _ in range(max_new_tokens):
        logits = base(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True, logits_to_keep=1, **extra).logits[:, -1]
        if do_sample:
            token = _sample(logits, temperature, top_p, generator)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out.append(token)
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        step_ids = token.unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    if not out:
        return input_ids.new_zeros((input_ids.shape[0], 0))
    return torch.stack(out, dim=1)
