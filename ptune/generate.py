"""Batched generation with a prefix: left-padded prompts, KV cache, per-row stop at EOS.

The prefix keys/values are computed once per batch and kept once for all rows, outside the KV cache:
the attention wrapper puts them in front of the prompt for the prefill, and each decoding step's
attention reads them from that one copy (:func:`ptune.prefix.shared_prefix_decode`, a Triton kernel on
CUDA), so a row's cache holds only its prompt and new tokens. Positions are passed explicitly so real
tokens start at 0. Every tensor a decoding step touches has a fixed address (a preallocated, static
cache), so on CUDA the step is captured once as a CUDA graph and replayed: one launch per token instead
of hundreds, which is what single-stream decoding of a 6B model is bound by. Models with sliding-window
layers keep a growing cache, through the same wrapper. Optionally the step goes through torch.compile
first, which fuses the hundreds of small elementwise kernels (norms, rotary, activations, residual adds)
around the matrix multiplies; the graph then captures the compiled step.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache, StaticCache

from ptune.capture import own_cublas_workspace
from ptune.errors import ConfigError
from ptune.prefix import PREFIX_KWARG, PrefixLM, position_ids_from_mask, prefix_attention_enabled

log = logging.getLogger("ptune.generate")

STOP_CHECK_EVERY = 16  # decoding steps between "has every row finished?" checks when nothing streams
# Kept decoders (generate(keep_decoder=True)) size their cache in steps of this many slots, so prompts of
# other lengths still fit one kept decoder; the decoding kernel skips the slots the mask hides.
KEEP_LENGTH_STEP = 256
KEEP_AT_MOST = 4  # kept decoders per model (one per batch size and length step), the oldest dropped first

# transformers 5.17 announces a rename of `past_key_values` whose replacement its models do not read
# yet (passing the new name silently drops the cache); keep the working name without the per-call noise.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def stop_token_ids(model, tokenizer, extra, key: str = "generation.extra_eos_token_ids") -> list[int]:
    """The tokenizer's EOS and the configured extra stop ids. An extra id past the model's output layer could
    never be generated: refused, rather than replies that silently never stop there."""
    base = model.base if isinstance(model, PrefixLM) else model
    size = base.get_output_embeddings().weight.shape[0]
    extra = [int(t) for t in (extra or [])]
    outside = [t for t in extra if t >= size]
    if outside:
        raise ConfigError(f"{key}={extra}: {', '.join(map(str, outside))} is not a token id of this model, whose "
                          f"output layer has {size} (ids 0 to {size - 1})")
    return [tokenizer.eos_token_id] + extra


def row_draws(keys: Sequence[Sequence[int]], steps: int, device) -> torch.Tensor:
    """(rows, steps) numbers in (0, 1], row r's from its own random stream, seeded by `keys[r]` (integers such as
    (seed, row number)). A sampled row then takes the same tokens whichever rows share its batch and in whatever
    order, where one stream drawn by the whole batch made every row depend on the others (and on the batch size)."""
    rows = [np.ones(steps) if key is None else 1.0 - np.random.default_rng(_entropy(key)).random(steps)
            for key in keys]  # a greedy row's key may be None
    return torch.from_numpy(np.stack(rows)).to(device)  # float64, as the cumulative probabilities they pick from


def _entropy(key: Sequence[int]) -> list[int]:
    # Every number as two 32-bit words after the key's length: numpy's seeding pads with zero words, so
    # (42,) and (42, 0) given as they are would share a stream, as would (2**32,) and (0, 1).
    words = [len(key)]
    for k in key:
        k = int(k) % 2**64  # a negative seed, as torch.Generator takes, is its two's complement
        words += [k & 0xFFFFFFFF, k >> 32]
    return words


class Sampler:
    """How each row picks its token: a greedy row the likeliest; a sampled row draws from softmax(logits /
    temperature) cut to the smallest set of likeliest tokens whose mass reaches top_p, by inverse transform with
    its own draw for the step (:func:`row_draws`). The settings may differ row by row, so requests with
    different ones share a batch.

    The cumulative probabilities run in vocabulary order and in float64 (the probabilities themselves, and the
    top_p cut, in float32: a float32 number keeps a small probability's own precision). Batched arithmetic changes
    a row's logits in the last bits (left padding, another matrix shape); in vocabulary order that moves each
    token's interval by as little, so a draw changes token about as rarely as a greedy pick flips at a near-tie.
    Sorted by probability, near-equal tokens would swap places and move whole intervals (7 of 16 rows of 64
    sampled tokens differed alone and batched on a CPU). Summed in float32, the tail of a large vocabulary
    (tokens below the last bit of a sum near 1) could never be drawn."""

    def __init__(self, rows: int, do_sample, temperature, top_p, keys, steps: int, device):
        def per_row(value, dtype):
            values = list(value) if isinstance(value, Sequence) else [value] * rows
            if len(values) != rows:
                raise ValueError(f"{len(values)} sampling settings for {rows} rows")
            return torch.tensor(values, dtype=dtype, device=device)

        self.sampled = per_row(do_sample, torch.bool)
        self.any = bool(self.sampled.any())
        if self.any and keys is None:
            raise ValueError("sampling needs sample_keys: one key per row, for each row's own random stream")
        if self.any:
            self.temperature = per_row(temperature, torch.float32).clamp(min=1e-5).unsqueeze(-1)
            self.top_p = per_row(top_p, torch.float32).unsqueeze(-1)
            self.cut = self.sampled.unsqueeze(-1) & (self.top_p < 1)  # top_p=1 keeps every token, even past rounding
            self.any_cut = bool(self.cut.any())
            self.draws = row_draws(keys, steps, device)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        greedy = logits.argmax(-1)
        if not self.any:
            return greedy
        probs = torch.softmax(logits.float() / self.temperature, -1)
        if self.any_cut:
            # The smallest likeliest set whose mass reaches top_p (the likeliest token always in it), as the least
            # probability it keeps: tokens as likely as that one stay too, whichever order a sort gave them.
            ranked = probs.sort(dim=-1, descending=True).values
            kept = (ranked.cumsum(-1) - ranked <= self.top_p).sum(-1, keepdim=True)
            probs = torch.where(self.cut & (probs < ranked.gather(-1, kept - 1)), 0.0, probs)
        cdf = probs.double().cumsum(-1)
        # The first token whose cumulative mass reaches the draw's share of the total: never one of mass 0.
        choice = torch.searchsorted(cdf, self.draws[:, step:step + 1] * cdf[:, -1:]).clamp_(max=cdf.shape[-1] - 1)
        return torch.where(self.sampled, choice.squeeze(-1), greedy)


def last_position(length: int, device) -> int | torch.Tensor:
    """`logits_to_keep` for the last position only. Past one position a tensor index, which gathers the
    hidden states into a contiguous block first: the slice transformers takes for an int is strided by the
    prompt length, and cuBLAS multiplied that by the output layer ~100x slower (128 ms for 1070 prompts)."""
    return 1 if length == 1 else torch.tensor([length - 1], device=device)


def _prefix_kwargs(base, prefix) -> dict:
    """The prefix as the attention wrapper's keyword argument, in the model's dtype once, not per layer and step."""
    if prefix is None:
        return {}
    dtype = next(base.parameters()).dtype
    # Copies: a kept decoder refills these buffers in place, and a prefix without projection is a view of
    # the encoder's own weights, which must not be written through.
    return {PREFIX_KWARG: tuple((k.to(dtype, copy=True), v.to(dtype, copy=True)) for k, v in prefix)}


def _decode_step(base, token, mask, position, cache, extra) -> torch.Tensor:
    return base(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache,
                use_cache=True, logits_to_keep=1, **extra).logits[:, -1]


@functools.cache
def _compiled_decode_step():
    # One compiled function for every model: dynamo keys the compiled code on guards (parameter and input
    # shapes, config values), not on the module, so another model of the same architecture reuses it and no
    # cache of ours keeps a model alive. Built on first use, as building it costs eager callers ~0.3 s.
    # dynamic=False keeps batch and model sizes static, so a new batch size compiles once more; the cache
    # length, which every prompt changes, is marked dynamic by the decoder instead. The supported models
    # compile to one graph (the tests check), yet not fullgraph=True: past dynamo's recompile limit (8
    # batch sizes x model shapes a process) that fails generation where it would otherwise run eagerly.
    return torch.compile(_decode_step, dynamic=False)


class StaticDecoder:
    """Prompt and new tokens in a preallocated cache; then one token per `step`, graph-replayed on CUDA.

    The cache holds prompt | new tokens; the prefix stays outside it, one copy for all rows, which the
    attention wrapper puts in front of the prompt for the prefill and the decoding kernel reads directly.
    A (batch, 1, 1, length) boolean mask says which slots each row may see (its unpadded prompt, what it
    generated so far); it is built once and one column is switched on per step, so no mask is rebuilt
    while decoding. With `compile_step` the step (not the prefill, whose shape changes with every prompt)
    runs compiled.
    """

    def __init__(self, base, prefix, input_ids, attention_mask, max_new_tokens: int, cuda_graph: bool,
                 compile_step: bool = False, length: int | None = None):
        batch, prompt = input_ids.shape
        length = length or prompt + max_new_tokens
        device = input_ids.device
        self.base, self.graph, self.use_graph, self.length = base, None, cuda_graph, length
        self.cache = StaticCache(config=base.config, max_cache_len=length)
        self.extra = _prefix_kwargs(base, prefix)
        self.mask = torch.zeros((batch, 1, 1, length), dtype=torch.bool, device=device)
        self.token = input_ids.new_zeros((batch, 1))
        self.position = input_ids.new_zeros((batch, 1))
        self.slot = torch.tensor([prompt], device=device)
        self._prefill(input_ids, attention_mask)
        self.steps = 0
        self.decode = _decode_step
        if compile_step:
            self.decode = _compiled_decode_step()
            # The length follows the prompt and max_new_tokens; static, every new length would recompile.
            torch._dynamo.mark_dynamic(self.mask, 3)
            for layer in self.cache.layers:
                torch._dynamo.mark_dynamic(layer.keys, 2)
                torch._dynamo.mark_dynamic(layer.values, 2)

    def _prefill(self, input_ids, attention_mask) -> None:
        """Write the prompt into the cache and set every tensor the decoding step reads, in place."""
        prompt, device = input_ids.shape[1], input_ids.device
        self.mask[:, 0, 0, :prompt] = attention_mask.bool()
        # As wide as the prompt, not the cache, where the attention wrapper is there to leave the unwritten
        # slots out (transformers' own attention wants a mask as wide as the keys).
        width = prompt if prefix_attention_enabled(self.base) else self.length
        causal = torch.arange(width, device=device) <= torch.arange(prompt, device=device).unsqueeze(1)
        positions = position_ids_from_mask(attention_mask)
        self.logits = self.base(input_ids=input_ids, attention_mask=self.mask[..., :width] & causal,
                                position_ids=positions, past_key_values=self.cache, use_cache=True,
                                logits_to_keep=last_position(prompt, device), **self.extra).logits[:, -1]
        self.position.copy_(positions[:, -1:] + 1)
        self.slot.fill_(prompt)

    def restart(self, prefix, input_ids, attention_mask) -> None:
        """Take new prompts (the same batch size, prompt + new tokens within the cache) and keep the captured
        graph: every tensor it reads is refilled in place, the prefix copied into the same buffers."""
        self.cache.reset()
        self.mask.zero_()
        for (k, v), (new_k, new_v) in zip(self.extra.get(PREFIX_KWARG, ()), _prefix_kwargs(self.base, prefix).get(
                PREFIX_KWARG, ())):
            k.copy_(new_k)
            v.copy_(new_v)
        self._prefill(input_ids, attention_mask)

    def _forward(self) -> None:
        self.logits = self.decode(self.base, self.token, self.mask, self.position, self.cache, self.extra)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits for the position after `token` (batch,), which takes the next cache slot."""
        self.token.copy_(token.unsqueeze(1))
        self.mask.index_fill_(-1, self.slot, True)
        if self.graph is not None:
            self.graph.replay()
            self.logits = self.graph_logits  # after a restart, self.logits was the prefill's
        elif self.use_graph and self.steps == 1:
            self._capture()
        elif self.use_graph:
            # The first step runs eagerly on a side stream: CUDA graphs want libraries warmed up, and a
            # compiled step compiled and autotuned, off the capturing stream.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward()
            torch.cuda.current_stream().wait_stream(side)
        else:
            self._forward()
        self.position += 1
        self.slot += 1
        self.steps += 1
        return self.logits

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with own_cublas_workspace(), torch.cuda.graph(graph):
                self._forward()
        except Exception as e:  # noqa: BLE001 -- a model that cannot be captured still decodes, just slower
            log.warning("decoding without a CUDA graph: capturing the step failed (%s)", e)
            self.use_graph = False
            self._forward()
            return
        self.graph, self.graph_logits = graph, self.logits
        graph.replay()


class GrowingDecoder:
    """Growing cache and the prefix through the attention wrapper: for models with sliding-window layers."""

    def __init__(self, base, prefix, input_ids, attention_mask):
        self.base, self.cache = base, DynamicCache(config=base.config)
        self.extra = _prefix_kwargs(base, prefix)
        self.mask = attention_mask
        self.position = position_ids_from_mask(attention_mask)
        self.logits = self._forward(input_ids)

    def _forward(self, ids):
        return self.base(input_ids=ids, attention_mask=self.mask, position_ids=self.position,
                         past_key_values=self.cache, use_cache=True,
                         logits_to_keep=last_position(ids.shape[1], ids.device), **self.extra).logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.position = self.position[:, -1:] + 1
        return self._forward(token.unsqueeze(1))


def _kept_decoder(base, prefix, input_ids, attention_mask, max_new_tokens: int) -> StaticDecoder:
    """A decoder kept on `base` for this batch size and cache length step, restarted on these prompts."""
    batch, prompt = input_ids.shape
    length = -(-(prompt + max_new_tokens) // KEEP_LENGTH_STEP) * KEEP_LENGTH_STEP
    kept = base.__dict__.setdefault("_ptune_kept_decoders", {})
    # with or without a prefix, and its shape: the captured graph reads the prefix buffers it was built with
    shape = None if prefix is None else (len(prefix), tuple(prefix[0][0].shape))
    key = (batch, length, input_ids.device, next(base.parameters()).dtype, shape)
    decoder = kept.pop(key, None)
    if decoder is not None:
        decoder.restart(prefix, input_ids, attention_mask)
    else:
        decoder = StaticDecoder(base, prefix, input_ids, attention_mask, max_new_tokens,
                                cuda_graph=input_ids.device.type == "cuda", length=length)
    kept[key] = decoder  # newest last
    while len(kept) > KEEP_AT_MOST:
        kept.pop(next(iter(kept)))
    return decoder


def release_decoding_memory(model) -> None:
    """After a generation ran out of device memory: drop the decoders kept on `model` (their caches and captured
    graphs) and hand the allocator's free blocks back, for a smaller batch or the next turn to use."""
    base = model.base if isinstance(model, PrefixLM) else model
    base.__dict__.pop("_ptune_kept_decoders", None)
    if next(base.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()


def has_sliding_layers(base) -> bool:
    layer_types = getattr(base.config.get_text_config(), "layer_types", None) or []
    return any("sliding" in t for t in layer_types)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             eos_token_ids: list[int], pad_token_id: int, do_sample: bool | Sequence[bool] = False,
             temperature: float | Sequence[float] = 1.0, top_p: float | Sequence[float] = 1.0,
             sample_keys: Sequence[Sequence[int]] | None = None, on_token=None,
             static_cache: bool = True, compile_step: bool = False, keep_decoder: bool = False) -> torch.Tensor:
    """New tokens `(B, n)` for left-padded prompts; rows that finished are filled with `pad_token_id`.

    `do_sample`, `temperature` and `top_p` are one value for every row or one per row (:class:`Sampler`); a
    sampled row needs its key in `sample_keys`, which seeds its own random stream (:func:`row_draws`).

    `model` is a PrefixLM or a bare transformers model. `on_token(tokens)` is called with each new
    column, for streaming. `static_cache=False` takes the growing-cache path (the reference the static
    one is tested against; models with sliding-window layers always take it). `compile_step=True` runs
    the static path's decoding step through torch.compile: the first call pays the compilation, and
    so does the first with each new batch size; other prompts and lengths reuse it. Its fused kernels
    round differently from eager ones, so in bf16 greedy tokens can part from the eager path's at near-ties.
    `keep_decoder=True` (chat, serve) keeps the static decoder, its cache and its captured CUDA graph on the
    model for the next call with the same batch size, instead of building and capturing it again (40-55 ms
    a call at batch 1 for a 6B model on an H100); the tokens are the same either way.
    """
    if max_new_tokens < 1:
        return input_ids.new_zeros((input_ids.shape[0], 0))
    pick = Sampler(input_ids.shape[0], do_sample, temperature, top_p, sample_keys, max_new_tokens, input_ids.device)
    base = model.base if isinstance(model, PrefixLM) else model
    prefix = model.prefix(1) if isinstance(model, PrefixLM) else None
    if static_cache and not has_sliding_layers(base) and keep_decoder and not compile_step:
        decoder = _kept_decoder(base, prefix, input_ids, attention_mask, max_new_tokens)
    elif static_cache and not has_sliding_layers(base):
        decoder = StaticDecoder(base, prefix, input_ids, attention_mask, max_new_tokens,
                                cuda_graph=input_ids.device.type == "cuda", compile_step=compile_step)
    else:
        decoder = GrowingDecoder(base, prefix, input_ids, attention_mask)
    eos = torch.tensor(eos_token_ids, device=input_ids.device, dtype=torch.long)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    logits, out = decoder.logits, []
    for i in range(max_new_tokens):
        token = pick(logits, i)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out.append(token)
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, eos)
        if i == max_new_tokens - 1:
            break
        # Asking the GPU whether every row is done waits for it; without a streaming consumer (which
        # waits for each token anyway) ask every STOP_CHECK_EVERY steps so the CPU can queue ahead.
        if (on_token is not None or (i + 1) % STOP_CHECK_EVERY == 0) and bool(done.all()):
            break
        logits = decoder.step(token)
    tokens = torch.stack(out, dim=1)
    # Columns decoded after every row had finished (at most STOP_CHECK_EVERY - 1) hold only padding.
    finished_before = torch.isin(tokens, eos).cumsum(1).gt(0).roll(1, dims=1)
    finished_before[:, 0] = False
    keep = int((~finished_before.all(0)).sum())
    return tokens[:, :keep]
