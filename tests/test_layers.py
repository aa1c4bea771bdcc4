"""Fused RMSNorm, SiLU gate and rotary kernels (ptune.layers) against the model's own code."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import tiny_config
from ptune.generate import generate
from ptune.layers import _Rotary, fuse_layers
from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA only")
VOCAB = 96


def tiny(family: str, device="cpu", dtype=torch.float32, width: int = 1):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, VOCAB)
    if width > 1:  # wide enough for several thread blocks per row, odd head counts
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 96 * width, 200 * width, 6
        cfg.head_dim = 16 * width
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device, dtype)
    with torch.no_grad():  # trained-looking norms, not all ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.requires_grad_(False).eval()


@pytest.mark.parametrize("family,expected", [("glm", 2 * 4 + 1), ("llama", 2 * 4 + 1), ("gpt2", 0), ("qwen2", 0)])
def test_swaps_the_supported_families_modules_and_back(family, expected):
    # Per layer two norms, the MLP and the attention; then the final norm.
    model = tiny(family)
    assert fuse_layers(model) == expected
    swapped = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(swapped) == expected
    assert fuse_layers(model, enabled=False) == expected
    assert not [m for m in model.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("family", ["glm", "llama"])
def test_query_key_value_weights_are_packed_without_copies(family):
    model = tiny(family)
    before = sum(p.numel() for p in model.parameters())
    want = {n: p.clone() for n, p in model.named_parameters()}
    fuse_layers(model)
    attn = model.model.layers[1].self_attn
    packed = attn._ptune_qkv_weight
    assert packed.shape[0] == sum(attn._ptune_qkv_sizes) == sum(
        getattr(attn, n).out_features for n in ("q_proj", "k_proj", "v_proj"))
    assert attn.q_proj.weight.data_ptr() == packed.data_ptr()
    assert attn.v_proj.weight.data_ptr() == packed[-attn.v_proj.out_features:].data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", ["glm", "llama"])
def test_cpu_runs_the_models_own_code(family):
    model = tiny(family)
    ids = torch.randint(4, VOCAB, (2, 7))
    before = model(input_ids=ids).logits
    fuse_layers(model)
    assert torch.equal(model(input_ids=ids).logits, before)


def _reference_grads(model, prefix, batch):
    lm = PrefixLM(model, prefix)
    lm.train()
    prefix.zero_grad(set_to_none=True)
    loss = lm(**batch).logits.float().log_softmax(-1)[..., 5].sum()
    loss.backward()
    return loss.detach(), prefix.embedding.weight.grad.clone()


@needs_cuda
@pytest.mark.parametrize("family", ["glm", "llama"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_loss_and_prefix_gradients_match_the_models_own_code(family, dtype, rtol):
    model = tiny(family, "cuda", dtype, width=2)
    spec = PrefixSpec.for_model(model.config, 5)
    torch.manual_seed(1)
    prefix = PrefixEncoder(spec).to("cuda", dtype)
    ids = torch.randint(4, VOCAB, (3, 11), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as training batches have
    batch = {"input_ids": ids, "attention_mask": mask}
    ref_loss, ref_grad = _reference_grads(model, prefix, batch)
    assert fuse_layers(model) > 0
    loss, grad = _reference_grads(model, prefix, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    scale = ref_grad.abs().max()
    assert (grad - ref_grad).abs().max() <= rtol * scale * 4
    # The gradient itself is not zero or constant: the comparison above could not pass by accident.
    assert scale > 0 and grad.std() > 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_norm_and_gate_forward_round_like_eager(dtype):
    model = tiny("glm", "cuda", dtype, width=3)
    norm, mlp = model.model.layers[0].input_layernorm, model.model.layers[0].mlp
    x = torch.randn(5, 7, norm.weight.shape[0], device="cuda", dtype=dtype) * 3
    h = torch.randn(5, 7, mlp.gate_up_proj.in_features, device="cuda", dtype=dtype)
    want_norm, want_mlp = norm(x), mlp(h)
    fuse_layers(model)
    got_norm, got_mlp = norm(x), mlp(h)
    assert got_norm.dtype == want_norm.dtype and got_norm.shape == want_norm.shape
    # The norm's sum of squares may be added up in another order: at most one unit in the last place apart.
    same = (got_norm == want_norm).float().mean().item()
    assert same > (0.99 if dtype != torch.float32 else 0.5)
    torch.testing.assert_close(got_norm, want_norm, rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-3, atol=1e-6)
    torch.testing.assert_close(got_mlp, want_mlp, rtol=0 if dtype != torch.float32 else 1e-5,
                               atol=0 if dtype != torch.float32 else 1e-5)


@needs_cuda
@pytest.mark.parametrize("family,interleaved", [("glm", True), ("llama", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_is_the_models_own_bit_for_bit_and_its_gradient_is_the_transpose(family, interleaved, dtype):
    model = tiny(family, "cuda", dtype, width=2)
    attn = model.model.layers[0].self_attn
    apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    b, t, h, d = 2, 9, 6, attn.head_dim
    pos = torch.arange(t, device="cuda").expand(b, t) + torch.tensor([[0], [3]], device="cuda")
    x = torch.randn(b, t, d, device="cuda", dtype=dtype)
    cos, sin = model.model.rotary_emb(x, pos)
    q = torch.randn(b, t, h, d, device="cuda", dtype=dtype, requires_grad=True)
    want, _ = apply(q.transpose(1, 2), q.transpose(1, 2), cos, sin)
    got = _Rotary.apply(q, cos, sin, interleaved)
    assert got.is_contiguous() and torch.equal(got, want)
    dy = torch.randn_like(got)
    (want_grad,) = torch.autograd.grad(want, q, dy)
    (got_grad,) = torch.autograd.grad(got, q, dy)
    # Eager rounds each term of the transpose to bf16, the kernel only the sum: a unit in the last place apart.
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(got_grad, want_grad, rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-5,
                               atol=scale * (2 ** -7 if dtype == torch.bfloat16 else 1e-6))


@needs_cuda
@pytest.mark.parametrize("family", ["glm", "llama"])
def test_static_and_growing_generation_agree_with_fused_layers(family):
    model = tiny(family, "cuda", torch.bfloat16, width=2)
    fuse_layers(model)
    spec = PrefixSpec.for_model(model.config, 4)
    torch.manual_seed(2)
    lm = PrefixLM(model, PrefixEncoder(spec).to("cuda", torch.bfloat16))
    ids = torch.randint(4, VOCAB, (6, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # left padding, as generation batches have
    kw = dict(max_new_tokens=20, eos_token_ids=[], pad_token_id=0)
    static = generate(lm, ids, mask, **kw)
    growing = generate(lm, ids, mask, static_cache=False, **kw)
    assert static.shape == (6, 20) and torch.equal(static, growing)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_cross_entropy_matches_torch(dtype):
    from ptune.data import IGNORE
    from ptune.loss import _CrossEntropySum

    torch.manual_seed(3)
    logits = (torch.randn(37, 5003, device="cuda") * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 5003, (37,), device="cuda")
    targets[[0, 5, 36]] = IGNORE
    targets[1] = 5002  # the last word: the kernel's final, partial block
    want = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE)
    got = _CrossEntropySum.apply(logits, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    (want_grad,) = torch.autograd.grad(want * 3, logits)
    (got_grad,) = torch.autograd.grad(got * 3, logits)
    assert got_grad.dtype == dtype and got_grad[[0, 5, 36]].abs().max() == 0
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
