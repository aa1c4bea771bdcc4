"""The compiled decoding step gives the eager step's tokens, and compiles once per batch size."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from ptune.data import left_pad
from ptune.generate import generate
from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec

VOCAB = 97
PROMPTS = [[5, 9, 11, 40, 7], [17, 23], [60, 61, 62, 63, 64, 65, 66], [8]]


def make_lm(family: str) -> PrefixLM:
    torch.manual_seed(0)
    cfg = tiny_config(family, VOCAB)
    if family == "glm":  # ChatGLM2's attention: grouped key/value heads, rotary on half of each head
        assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.partial_rotary_factor == 0.5
    model = AutoModelForCausalLM.from_config(cfg).float()
    prefix = PrefixEncoder(PrefixSpec.for_model(model.config, 5))
    with torch.no_grad():
        prefix.embedding.weight.normal_(0, 0.5)  # the default init is too small to make the prefix matter
        model.get_output_embeddings().weight.mul_(8)  # peaked logits: no near-ties for fused kernels to flip
    return PrefixLM(model, prefix)


@pytest.mark.slow  # two compilations of C++ kernels: ~30 s on 2 cores, ~6 s from inductor's disk cache
@pytest.mark.parametrize("family", ["llama", "glm"])
def test_compiled_step_matches_eager_and_growing_cache(family):
    lm = make_lm(family)
    torch._dynamo.reset()
    counters.clear()
    compiled = []
    # Same batch with longer prompts and fewer new tokens (a different cache length), then a smaller batch.
    for prompts, new_tokens in [(PROMPTS, 8), ([p + [70, 71, 72] for p in PROMPTS], 6), (PROMPTS[:2], 8)]:
        batch = left_pad(prompts, pad_token_id=0)
        runs = {name: generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=new_tokens,
                               eos_token_ids=[], pad_token_id=0, **options)
                for name, options in [("compiled", {"compile_step": True}), ("static", {}),
                                      ("growing", {"static_cache": False})]}
        assert runs["compiled"].shape == (len(prompts), new_tokens)
        assert torch.equal(runs["compiled"], runs["static"]) and torch.equal(runs["compiled"], runs["growing"])
        compiled.append(counters["stats"]["unique_graphs"])
    assert compiled == [1, 1, 2]  # a new cache length reuses the step; only a new batch size compiles it again
    assert not counters["graph_break"]
