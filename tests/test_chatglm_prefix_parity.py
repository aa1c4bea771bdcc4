"""ptune's prefix encoder on a converted ChatGLM2 model against the original P-tuning v2 code.

The reference (original ChatGLM3 modeling code with pre_seq_len=8, prefix_projection False/True,
in eval mode) recorded loss, logits, the gradient of every prefix encoder parameter and 20 greedy
tokens; tests/golden/make_chatglm_golden.py made them.  Here the same prefix weights go into
ptune's PrefixEncoder in front of the converted GlmForCausalLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ptune.chatglm.convert import load_chatglm
from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "chatglm"
REF_PREFIX = "transformer.prefix_encoder."


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


def build(projection: bool, attn: str = "sdpa") -> tuple[PrefixLM, dict[str, torch.Tensor]]:
    ref = load_file(str(GOLDEN / f"ptuning_{'proj' if projection else 'noproj'}.safetensors"))
    base = load_chatglm(GOLDEN / "tiny_chatglm2", dtype=torch.float32, verify="size", attn_implementation=attn)
    spec = PrefixSpec.for_model(base.config, 8, projection=projection,
                                projection_hidden_size=base.config.hidden_size if projection else None)
    enc = PrefixEncoder(spec, dropout=0.0)
    weights = {k[len("weight."):]: v for k, v in ref.items() if k.startswith("weight.")}
    enc.load_state_dict(weights, strict=True)
    return PrefixLM(base, enc), ref


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("projection", [False, True], ids=["no-projection", "projection"])
def test_loss_logits_and_prefix_gradient_match(projection, attn):
    lm, ref = build(projection, attn)
    out = lm(ref["input_ids"])
    assert_close_rel(out.logits.detach(), ref["logits"])
    loss = shifted_loss(out.logits, ref["labels"])
    assert abs(loss.item() - ref["loss"].item()) <= 1e-4 * abs(ref["loss"].item())
    loss.backward()
    grads = {name: p.grad for name, p in lm.prefix.named_parameters()}
    expected = {k[len("grad."):]: v for k, v in ref.items() if k.startswith("grad.")}
    assert set(grads) == set(expected)
    for name, g in expected.items():
        assert grads[name] is not None, name
        assert_close_rel(grads[name], g)
    assert all(p.grad is None for p in lm.base.parameters())  # the base stays frozen


@pytest.mark.parametrize("projection", [False, True], ids=["no-projection", "projection"])
def test_greedy_generation_with_prefix_matches(projection):
    lm, ref = build(projection)
    ids = ref["gen_prompt"]
    with torch.no_grad():
        for _ in range(20):
            nxt = lm(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=-1)
    assert ids.tolist() == ref["gen_output"].tolist()


def test_reference_ptuning_checkpoint_loads():
    """A prefix saved by the original P-tuning scripts (only transformer.prefix_encoder.* keys)."""
    folder = GOLDEN / "ptuning_checkpoint"
    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    assert all(k.startswith(REF_PREFIX) for k in sd)
    base = load_chatglm(GOLDEN / "tiny_chatglm2", dtype=torch.float32, verify="size")
    spec = PrefixSpec.for_model(base.config, int(cfg["pre_seq_len"]), projection=bool(cfg["prefix_projection"]))
    enc = PrefixEncoder(spec)
    enc.load_state_dict({k[len(REF_PREFIX):]: v for k, v in sd.items()}, strict=True)
    ref = load_file(str(GOLDEN / "ptuning_noproj.safetensors"))
    with torch.no_grad():
        logits = PrefixLM(base, enc)(ref["input_ids"]).logits
    assert_close_rel(logits, ref["logits"])
