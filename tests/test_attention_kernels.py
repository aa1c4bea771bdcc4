"""Decoding attention over one shared prefix copy (ptune.prefix.shared_prefix_decode: the Triton kernel of
ptune.attention_kernels on CUDA, PyTorch elsewhere) against SDPA with the prefix copied in front of each row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from ptune.generate import StaticDecoder
from ptune.prefix import (PrefixEncoder, PrefixLM, PrefixSpec, _shared_decode_fits, _triton_decode_fits,
                          shared_prefix_decode)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the decoding kernel runs on CUDA only")


def reference(query, key, value, prefix_key, prefix_value, mask):
    """float32 SDPA with the prefix copied in front of every row's cache, every query head its own copy."""
    b, hq, _, d = query.shape
    group = hq // key.shape[1]
    k = torch.cat([prefix_key.expand(b, -1, -1, -1), key], 2).float().repeat_interleave(group, 1)
    v = torch.cat([prefix_value.expand(b, -1, -1, -1), value], 2).float().repeat_interleave(group, 1)
    visible = torch.cat([torch.ones((b, 1, 1, prefix_key.shape[2]), dtype=torch.bool, device=mask.device), mask], -1)
    return F.scaled_dot_product_attention(query.float(), k, v, attn_mask=visible).transpose(1, 2)


def case(heads, kv_heads, dim, dtype, batch=5, plen=37, length=150, filled=101, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, device=device, generator=g) * 2).to(dtype)

    q = rand(batch, heads, 1, dim)
    pk, pv = rand(1, kv_heads, plen, dim), rand(1, kv_heads, plen, dim)
    k, v = rand(batch, kv_heads, length, dim), rand(batch, kv_heads, length, dim)
    mask = torch.zeros((batch, 1, 1, length), dtype=torch.bool, device=device)
    mask[..., :filled] = True
    mask[1, ..., :70] = False  # left padding hiding whole blocks
    mask[3, ..., :3] = False
    return q, k, v, pk, pv, mask


@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 2, 128), (9, 3, 24), (4, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_path_matches_sdpa(heads, kv_heads, dim, dtype):
    q, k, v, pk, pv, mask = case(heads, kv_heads, dim, dtype, device="cpu")
    want = reference(q, k, v, pk, pv, mask)
    got = shared_prefix_decode(q, k, v, pk, pv, mask)
    assert got.shape == (5, 1, heads, dim) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    everything = torch.ones_like(mask[..., :101])
    torch.testing.assert_close(shared_prefix_decode(q, k[:, :, :101], v[:, :, :101], pk, pv, None).float(),
                               reference(q, k[:, :, :101], v[:, :, :101], pk, pv, everything),
                               rtol=tol, atol=tol * want.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 2, 128), (9, 3, 64), (4, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_sdpa_and_never_reads_hidden_slots(heads, kv_heads, dim, dtype):
    q, k, v, pk, pv, mask = case(heads, kv_heads, dim, dtype)
    want = reference(q, k, v, pk, pv, mask)
    # What the mask hides is never read: NaNs there would poison any softmax that touched them.
    hidden = ~mask[:, 0, 0][:, None, :, None].expand_as(k)
    got = shared_prefix_decode(q, k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan")), pk, pv,
                               mask, dim ** -0.5)
    assert got.shape == (5, 1, heads, dim) and got.dtype == dtype
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


@needs_cuda
def test_new_lengths_reuse_the_compiled_kernel():
    """Prompt and cache lengths change with every batch and max_new_tokens; none may compile the kernel again
    (a 2-token warm-up once left a 128-token generation compiling ~1 s inside it)."""
    from ptune import attention_kernels

    caches = getattr(attention_kernels.decode_attention, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps its compiled kernels elsewhere")

    def compiled() -> int:
        return sum(len(entry[0]) for entry in caches.values())

    for length, filled, plen in [(66, 65, 128), (192, 130, 128), (161, 100, 37), (80, 80, 16)]:
        shared_prefix_decode(*case(32, 2, 128, torch.bfloat16, length=length, filled=filled, plen=plen))
        if length == 66:
            first = compiled()
    assert first >= 1 and compiled() == first


@needs_cuda
def test_a_static_cache_gives_the_bits_of_a_growing_one():
    q, k, v, pk, pv, mask = case(32, 2, 128, torch.bfloat16, filled=101)
    static = shared_prefix_decode(q, k, v, pk, pv, mask)
    grown = shared_prefix_decode(q, k[:, :, :101], v[:, :, :101], pk, pv, mask[..., :101])
    assert torch.equal(static, grown)
    # No mask: every slot visible, as a growing cache without padding passes it.
    full = shared_prefix_decode(q, k[:, :, :101], v[:, :, :101], pk, pv, None)
    everything = torch.ones_like(mask[..., :101])
    assert torch.equal(full, shared_prefix_decode(q, k[:, :, :101], v[:, :, :101], pk, pv, everything))


def test_which_steps_read_the_shared_prefix_and_which_run_the_kernel():
    q, k = torch.zeros(2, 4, 1, 16, dtype=torch.bfloat16), torch.zeros(2, 2, 9, 16, dtype=torch.bfloat16)
    pk = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)
    assert _shared_decode_fits(q, pk, None, 0.0)
    assert _shared_decode_fits(q, pk, torch.ones(2, 1, 1, 9, dtype=torch.bool), 0.0)
    assert not _shared_decode_fits(q.expand(2, 4, 3, 16), pk, None, 0.0)  # a prefill
    assert not _shared_decode_fits(q, pk.expand(2, -1, -1, -1), None, 0.0)  # per-row prefixes (training dropout)
    assert not _shared_decode_fits(q, pk, torch.zeros(2, 1, 1, 9), 0.0)  # an additive mask
    assert not _shared_decode_fits(q, pk, None, 0.1)
    assert not _triton_decode_fits(q, k)  # the CPU runs the PyTorch path
    if torch.cuda.is_available():
        assert _triton_decode_fits(q.cuda(), k.cuda())
        assert not _triton_decode_fits(q.cuda().float(), k.cuda().float())
        assert not _triton_decode_fits(q[..., :12].cuda(), k[..., :12].cuda())  # not a power of two


@needs_cuda
@pytest.mark.parametrize("family", ["glm", "llama"])
def test_decoding_steps_match_recomputing_through_the_wrapper(family):
    """Logits of each cached decoding step (the kernel) against a full forward pass over prompt and new
    tokens (SDPA with the prefix copied in, the training path), left padding included."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, 96)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim = 128, 256, 8, 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to("cuda", torch.bfloat16).eval()
    prefix = PrefixEncoder(PrefixSpec.for_model(model.config, 70)).to("cuda")
    with torch.no_grad():
        prefix.embedding.weight.normal_(0, 1)
    lm = PrefixLM(model, prefix)
    ids = torch.randint(4, 96, (3, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        decoder = StaticDecoder(model, prefix(1), ids, mask, max_new_tokens=6, cuda_graph=False)
        logits = decoder.logits
        for _ in range(5):
            token = logits.argmax(-1)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = decoder.step(token)
            want = lm(ids, attention_mask=mask).logits[:, -1].float()
            torch.testing.assert_close(logits.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
