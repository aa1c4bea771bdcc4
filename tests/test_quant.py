"""Weight-only int8/int4 quantization of the frozen base: layer error, prefix gradients, memory, cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from conftest import tiny_config, toy_batch
from ptune import quant as Q
from ptune.loss import lm_loss_sum, output_softcap
from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec

VOCAB = 97


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def normal_linear(in_f=512, out_f=256, seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    nn.init.normal_(lin.weight, 0.0, 0.02)  # the init transformers uses for decoder weights
    return lin


# ------------------------------------------------------------------------------------- one layer


@pytest.mark.parametrize("init", ["normal", "default"])
@pytest.mark.parametrize("mode,group,limit", [("int8", 128, 0.01), ("int4", 128, 0.10), ("int4", 32, 0.08)])
def test_layer_output_error(init, mode, group, limit):
    lin = normal_linear() if init == "normal" else (torch.manual_seed(0), nn.Linear(512, 256))[1]
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = lin(x)
        got = Q.QuantizedLinear.from_float(lin, mode, group)(x)
    err = rel_err(got, want)
    assert err < limit, (mode, group, init, err)
    assert err > 1e-4  # it really is quantized


def test_int8_elementwise_bound_and_int4_codes():
    lin = normal_linear()
    q8 = Q.QuantizedLinear.from_float(lin, "int8")
    assert q8.qweight.dtype == torch.int8 and q8.scale.shape == (256,)
    assert ((q8.dequantized_weight() - lin.weight).abs() <= q8.scale[:, None] / 2 + 1e-7).all()
    q4 = Q.QuantizedLinear.from_float(lin, "int4", 128)
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.shape == (256, 256)
    assert q4.scale.shape == q4.offset.shape == (256, 4)
    codes = Q.unpack_int4(q4.qweight, 128)
    assert codes.shape == (256, 512) and int(codes.max()) <= 15
    # Byte k of a group holds codes k and k + 64: repacking so gives the same bytes (packing is lossless).
    g = codes.view(256, 4, 128)
    assert torch.equal((g[..., :64] | (g[..., 64:] << 4)).view(256, 256), q4.qweight)
    # And the codes are the weight's: widening them by hand gives dequantize's weight.
    by_hand = g.float() * q4.scale.unsqueeze(-1) + q4.offset.unsqueeze(-1)
    assert torch.equal(by_hand.view(256, 512), q4.dequantized_weight(torch.float32))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gradient_is_input_only_and_matches_dequantized_weight(mode):
    lin = normal_linear(bias=True)
    q = Q.QuantizedLinear.from_float(lin, mode, 64)
    x = torch.randn(2, 7, 512, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = q.dequantized_weight(torch.float32)
    torch.testing.assert_close(y, F.linear(x, w, q.bias), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-6)
    assert not q.bias.requires_grad and q.bias.grad is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_backward_does_not_keep_a_float_weight(mode):
    """Only the stored low-bit tensors are saved for backward, never a dequantized (out, in) float weight."""
    q = Q.QuantizedLinear.from_float(normal_linear(), mode, 128)
    saved = []
    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert saved, "nothing saved: the autograd function did not run"
    assert not any(t.is_floating_point() and t.shape == (256, 512) for t in saved)
    assert x.grad is not None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_input(mode):
    lin = normal_linear()
    q = Q.QuantizedLinear.from_float(lin, mode, 128)
    x = torch.randn(8, 512)
    with torch.no_grad():
        got = q(x.bfloat16())
        want = q(x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 1e-2


def test_int8pack_kernel_agrees_with_dequantize_path(monkeypatch):
    q = Q.QuantizedLinear.from_float(normal_linear(), "int8")
    x = torch.randn(3, 5, 512).bfloat16()
    with torch.no_grad():
        monkeypatch.setattr(Q, "USE_INT8PACK_MM", False)
        plain = q(x)
        monkeypatch.setattr(Q, "USE_INT8PACK_MM", True)
        fast = q(x)
    assert fast.shape == plain.shape == (3, 5, 256)
    assert rel_err(fast, plain) < 1e-2
    if not Q._int8pack_ok(torch.device("cpu"), torch.bfloat16):
        pytest.skip("torch._weight_int8pack_mm unavailable here; only the dequantize path was checked")


def test_odd_in_features_are_padded_to_the_group():
    torch.manual_seed(0)
    lin = nn.Linear(100, 37)
    nn.init.normal_(lin.weight, 0.0, 0.02)
    q = Q.QuantizedLinear.from_float(lin, "int4", 32)
    assert q.qweight.shape == (37, 64) and q.scale.shape == (37, 4)  # 100 -> 128 columns
    x = torch.randn(3, 5, 100, requires_grad=True)
    y = q(x)
    assert y.shape == (3, 5, 37)
    assert rel_err(y.detach(), lin(x).detach()) < 0.10
    y.sum().backward()
    assert x.grad.shape == x.shape
    i8 = Q.QuantizedLinear.from_float(lin, "int8")  # int8 has no groups: any width
    assert rel_err(i8(x).detach(), lin(x).detach()) < 0.01


def test_dequantize_rounds_once_to_the_target_dtype():
    """Widening is done in float32 and rounded once, as the CUDA kernels do: the bf16 weight is exactly the
    float32 one rounded (at an odd width, which exercises the padding slice)."""
    torch.manual_seed(0)
    lin = nn.Linear(100, 40)
    for mode, group in (("int4", 32), ("int8", 0)):
        q = Q.QuantizedLinear.from_float(lin, mode, group or 128)
        args = (q.qweight, q.scale, q.offset, q.in_features, q.group_size)
        got, exact = Q.dequantize(*args, torch.bfloat16), Q.dequantize(*args, torch.float32)
        assert got.shape == exact.shape == (40, 100)
        assert torch.equal(got, exact.to(torch.bfloat16)), mode


def test_fused_dequantize_falls_back_to_eager_once_the_kernel_fails(monkeypatch, caplog):
    import sys

    import ptune

    monkeypatch.setitem(sys.modules, "ptune.dequant_kernels", None)  # as if triton were missing
    # ... and `from ptune import dequant_kernels` finds the package's attribute first, once anything imported it
    monkeypatch.delattr(ptune, "dequant_kernels", raising=False)
    monkeypatch.setattr(Q, "FUSED_DEQUANTIZE", True)
    q = Q.QuantizedLinear.from_float(nn.Linear(64, 8), "int4", 32)
    args = (q.qweight, q.scale, q.offset, q.in_features, q.group_size, torch.float32)
    assert torch.equal(Q._fused_dequantize(*args), Q.dequantize(*args))
    assert Q.FUSED_DEQUANTIZE is False and Q._dequantize_on(torch.device("cuda")) is Q.dequantize
    assert "dequantizing without the fused CUDA kernel from now on: ModuleNotFoundError" in caplog.text


def test_bad_mode_or_group_is_refused():
    lin = normal_linear()
    with pytest.raises(Q.QuantizationError, match="expected one of int8, int4"):
        Q.QuantizedLinear.from_float(lin, "int3")
    with pytest.raises(Q.QuantizationError, match="even group size"):
        Q.QuantizedLinear.from_float(lin, "int4", 33)


def test_constant_and_zero_rows_are_exact():
    lin = normal_linear()
    with torch.no_grad():
        lin.weight[0] = 0.0
        lin.weight[1] = 0.5
    for mode in ("int8", "int4"):
        w = Q.QuantizedLinear.from_float(lin, mode, 128).dequantized_weight()
        assert torch.equal(w[0], torch.zeros(512))
        torch.testing.assert_close(w[1], torch.full((512,), 0.5))


# ---------------------------------------------------------------------------------- whole models


def tiny_base(family: str, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    cfg = tiny_config(family, VOCAB)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype).eval()


def with_prefix(base, dtype) -> PrefixLM:
    torch.manual_seed(1)
    prefix = PrefixEncoder(PrefixSpec.for_model(base.config, 5))
    with torch.no_grad():  # large enough to matter
        prefix.embedding.weight.normal_(0, 0.5)
    return PrefixLM(base, prefix.to(dtype))


def loss_and_prefix_grad(lm: PrefixLM):
    batch = toy_batch(VOCAB)
    lm.train()
    hidden = lm.decoder(batch["input_ids"], batch["attention_mask"])
    total, n = lm_loss_sum(hidden, batch["labels"], lm.base.get_output_embeddings(), 4, output_softcap(lm.config))
    (total / n).backward()
    return float((total / n).detach()), lm.prefix.embedding.weight.grad.float().clone()


@pytest.mark.parametrize("family", ["llama", "glm", "gpt2"])
@pytest.mark.parametrize("mode,min_cos", [("int8", 0.999), ("int4", 0.95)])
def test_prefix_gradient_through_quantized_base(family, mode, min_cos):
    """Reference: the same base in bf16 (the dtype it trains in on a GPU), quantized from that bf16 base."""
    ref_loss, ref_grad = loss_and_prefix_grad(with_prefix(tiny_base(family, torch.bfloat16), torch.bfloat16))
    base = tiny_base(family, torch.bfloat16)
    summary = Q.quantize_model(base, mode, 32)
    assert summary["layers"] == len([m for m in base.modules() if isinstance(m, Q.QuantizedLinear)]) > 0
    lm = with_prefix(base, torch.bfloat16)
    loss, grad = loss_and_prefix_grad(lm)
    assert grad.norm() > 0
    assert cosine(grad, ref_grad) >= min_cos, (family, mode, cosine(grad, ref_grad))
    assert abs(loss - ref_loss) < 0.02 * ref_loss
    assert all(p.grad is None and not p.requires_grad for p in lm.base.parameters())


def test_only_decoder_linears_are_replaced():
    base = tiny_base("llama")
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    summary = Q.quantize_model(base, "int8")
    assert summary["layers"] == 2 * 7  # q k v o gate up down, two layers
    assert base.get_input_embeddings() is emb and base.get_output_embeddings() is head
    assert isinstance(head, nn.Linear) and head.weight.dtype == torch.float32
    assert not any(type(m) is nn.Linear for m in base.model.layers.modules())
    assert base.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert base.ptune_quantization == {"mode": "int8", "group_size": None}


def test_skip_and_misuse():
    base = tiny_base("llama")
    summary = Q.quantize_model(base, "int4", 32, skip=("lm_head", "o_proj"))
    assert summary["layers"] == 2 * 6
    assert type(base.model.layers[0].self_attn.o_proj) is nn.Linear
    with pytest.raises(Q.QuantizationError, match="get_decoder"):
        Q.quantize_model(with_prefix(tiny_base("llama"), torch.float32), "int8")


@pytest.mark.parametrize("mode,limit", [("int8", 0.35), ("int4", 0.20)])
def test_memory_of_decoder_linears(mode, limit):
    base = tiny_base("llama", hidden_size=128, intermediate_size=256)
    names = Q.quantizable_layers(base)
    fp32 = sum(base.get_submodule(n).weight.numel() * 4 for n in names)
    summary = Q.quantize_model(base, mode, 128)
    stored = sum(t.numel() * t.element_size() for n in names
                 for t in list(base.get_submodule(n).buffers()))
    assert summary["bytes_before"] == fp32 and summary["bytes_after"] == stored
    assert stored < limit * fp32, (mode, stored / fp32)


def test_gradient_checkpointing_same_result():
    base = tiny_base("llama")
    Q.quantize_model(base, "int4", 32)
    lm = with_prefix(base, torch.float32)
    loss_off, grad_off = loss_and_prefix_grad(lm)
    lm.prefix.zero_grad(set_to_none=True)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_on, grad_on = loss_and_prefix_grad(lm)
    assert abs(loss_on - loss_off) < 1e-6
    assert rel_err(grad_on, grad_off) < 1e-5


# ----------------------------------------------------------------------------------------- cache


def logits(model, lm=None):
    ids = toy_batch(VOCAB)["input_ids"]
    with torch.no_grad():
        return (lm or model)(ids).logits


@pytest.mark.parametrize("family,mode", [("llama", "int4"), ("glm", "int8"), ("gpt2", "int4")])
def test_cache_round_trip_is_bitwise(tmp_path, family, mode):
    base = tiny_base(family)  # gpt2: Conv1D layers and a tied output layer
    Q.quantize_model(base, mode, 32)
    want = logits(base)
    Q.save_quantized(base, tmp_path / "q")
    again = Q.load_quantized(tmp_path / "q", attn_implementation="sdpa")
    assert type(again) is type(base)
    assert torch.equal(logits(again), want)
    for (n1, t1), (n2, t2) in zip(base.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    assert not any(p.requires_grad for p in again.parameters()) and not again.training
    if family == "gpt2":
        assert again.get_output_embeddings().weight is again.get_input_embeddings().weight
    # Through the prefix too: same prefix, same logits.
    assert torch.equal(logits(None, with_prefix(base, torch.float32)), logits(None, with_prefix(again, torch.float32)))


def counting_loader(src):
    """A float-model loader for `quantized_base` and the list its calls are counted in."""
    calls = []

    def load_float():
        calls.append(1)
        return AutoModelForCausalLM.from_pretrained(src, local_files_only=True)

    return load_float, calls


def test_a_cache_in_the_base_models_own_folder_is_refused_before_writing(tmp_path, tiny_model_dir):
    """The cache writes a config.json of its own: in the base's folder it would replace the base's."""
    import shutil

    from omegaconf import OmegaConf

    from ptune.models import ModelError, load_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("llama"), base)
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    cfg = OmegaConf.create({"path": str(base), "dtype": "float32", "attn_implementation": "sdpa",
                            "trust_remote_code": False, "quantization": "int8", "quantization_group_size": 128,
                            "quantization_cache": str(base) + "/"})
    with pytest.raises(ModelError, match=r"model.quantization_cache=.*: that is the base model's own folder"):
        load_model(cfg)
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("quantization, smaller", [
    (None, "load it smaller (model.quantization=int8 or int4, model.dtype=bfloat16)"),
    ("int8", "load it smaller (model.quantization=int4, model.dtype=bfloat16)"),
])
def test_a_base_that_does_not_fit_the_device_is_one_line_saying_what_would(tmp_path, tiny_model_dir, monkeypatch,
                                                                          quantization, smaller):
    """What the CUDA allocator raises when the weights go to a device too small, injected into that move."""
    from omegaconf import OmegaConf

    from ptune.models import ModelError, load_model

    module_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        # The whole model's move to the device; a quantized base makes it only once its decoder is quantized.
        if isinstance(self, PreTrainedModel) and (quantization is None or hasattr(self, "ptune_quantization")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total capacity "
                                         "of 23.55 GiB of which 20.00 MiB is free.\nIncluding non-PyTorch memory ...")
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    base = tiny_model_dir("llama")
    cfg = OmegaConf.create({"path": str(base), "dtype": "float32", "attn_implementation": "sdpa",
                            "trust_remote_code": False, "quantization": quantization, "quantization_group_size": 128,
                            "quantization_cache": None})
    with pytest.raises(ModelError) as e:
        load_model(cfg)
    assert str(e.value) == (f"model.path={base}: the model does not fit in the memory of cpu (CUDA out of memory. "
                            "Tried to allocate 1.95 GiB. GPU 0 has a total capacity of 23.55 GiB of which 20.00 MiB is "
                            f"free.); free the device's memory, {smaller}, or use a device with more memory")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
def test_a_quantized_base_reaches_the_device_one_float_layer_at_a_time(tmp_path):
    """A base that only fits the device once quantized still loads: its float decoder never sits there whole."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig

    from ptune.models import load_model

    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    cfg = OmegaConf.create({"path": str(tmp_path / "base"), "dtype": "bfloat16", "attn_implementation": "sdpa",
                            "trust_remote_code": False, "quantization": "int4", "quantization_group_size": 32,
                            "quantization_cache": None})
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(cfg, "cuda")
    held = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    float_decoder = 2 * config.num_hidden_layers * (4 * config.hidden_size**2
                                                    + 3 * config.hidden_size * config.intermediate_size)
    assert model.ptune_quantization["mode"] == "int4"
    assert all(p.device.type == "cuda" for p in model.parameters())
    # The whole float decoder on the device at once would put the peak at least 3/4 of it (int4 keeps a quarter)
    # above what stays; one float layer and its quantization's temporaries at a time (6.1 MB here on an H200,
    # of a 16.8 MB decoder) keep it under half.
    assert peak - held < float_decoder / 2, (peak, held, float_decoder)


def test_quantized_base_uses_the_cache_until_the_source_changes(tmp_path, tiny_model_dir):
    src = tiny_model_dir("llama")
    cache = tmp_path / "cache"
    load_float, calls = counting_loader(src)
    kw = dict(cache_dir=cache, source=src, dtype=torch.float32, attn_implementation="sdpa")
    first = Q.quantized_base(load_float, "int4", 32, **kw)
    assert len(calls) == 1 and (cache / Q.META_FILE).is_file()
    second = Q.quantized_base(load_float, "int4", 32, **kw)
    assert len(calls) == 1, "the second load quantized again"
    assert torch.equal(logits(first), logits(second))
    # Another group size, dtype or changed source files: not this cache.
    assert not Q.cache_matches(cache, "int4", 64, torch.float32, Q.source_fingerprint(src))
    assert not Q.cache_matches(cache, "int8", 32, torch.float32, Q.source_fingerprint(src))
    assert not Q.cache_matches(cache, "int4", 32, torch.bfloat16, Q.source_fingerprint(src))
    (tmp_path / "other").mkdir()
    assert not Q.cache_matches(cache, "int4", 32, torch.float32, Q.source_fingerprint(tmp_path / "other"))
    Q.quantized_base(load_float, "int8", **kw)
    assert len(calls) == 2


def test_cache_of_an_older_layout_is_rebuilt_not_misread(tmp_path, tiny_model_dir):
    """Format 1 interleaved int4 nibbles; its bytes read with today's layout would be wrong weights."""
    src = tiny_model_dir("llama")
    cache = tmp_path / "cache"
    load_float, calls = counting_loader(src)
    kw = dict(cache_dir=cache, source=src, dtype=torch.float32, attn_implementation="sdpa")
    fresh = Q.quantized_base(load_float, "int4", 32, **kw)
    meta = json.loads((cache / Q.META_FILE).read_text())
    (cache / Q.META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(Q.QuantizationError, match="cache format 1, this ptune reads 2; delete the folder"):
        Q.load_quantized(cache)
    rebuilt = Q.quantized_base(load_float, "int4", 32, **kw)
    assert len(calls) == 2 and json.loads((cache / Q.META_FILE).read_text())["format_version"] == 2
    assert torch.equal(logits(fresh), logits(rebuilt))


def _without_layers(p: Path) -> None:
    meta = json.loads(p.read_text())
    del meta["layers"]
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("file, damage, warned", [
    pytest.param(Q.WEIGHTS_FILE, lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), True,
                 id="truncated"),
    pytest.param(Q.WEIGHTS_FILE, lambda p: p.write_bytes(b"\x00" * 64), True, id="zeroed"),
    pytest.param("config.json", lambda p: p.write_text("\n"), True, id="config-emptied"),
    pytest.param("config.json", Path.unlink, True, id="config-deleted"),
    pytest.param("generation_config.json", lambda p: p.write_text("{x"), True, id="generation-config-broken"),
    pytest.param(Q.META_FILE, lambda p: p.write_text("[]"), False, id="meta-a-list"),  # no cache at all: rebuilt
    pytest.param(Q.META_FILE, _without_layers, True, id="meta-without-layers"),
])
def test_a_damaged_cache_is_rebuilt(tmp_path, tiny_model_dir, caplog, file, damage, warned):
    """A cache damaged after it was written (a copy interrupted, a full disk, an edit) is rebuilt with a
    warning, whichever of its files it is."""
    src = tiny_model_dir("llama")
    cache = tmp_path / "cache"
    load_float, calls = counting_loader(src)
    kw = dict(cache_dir=cache, source=src, dtype=torch.float32, attn_implementation="sdpa")
    fresh = Q.quantized_base(load_float, "int4", 32, **kw)
    damage(cache / file)
    with caplog.at_level("WARNING", logger="ptune.quant"):
        rebuilt = Q.quantized_base(load_float, "int4", 32, **kw)
    assert len(calls) == 2
    assert (f"the quantized cache in {cache} cannot be read" in caplog.text) == warned
    assert torch.equal(logits(fresh), logits(rebuilt))
    assert torch.equal(logits(Q.quantized_base(load_float, "int4", 32, **kw)), logits(fresh)) and len(calls) == 2


def test_a_cache_folder_holding_other_files_is_refused_and_left_alone(tmp_path, tiny_model_dir):
    """Another model's folder given as the cache: writing the cache would replace its config.json."""
    src = tiny_model_dir("llama")
    other = tmp_path / "other"
    shutil.copytree(src, other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    load_float, calls = counting_loader(src)
    with pytest.raises(Q.QuantizationError, match=rf"^model.quantization_cache={other}: holds \w.*model.safetensors.* "
                                                  r"and \d+ more, so it is not a quantized cache"):
        Q.quantized_base(load_float, "int8", cache_dir=other, source=src, dtype=torch.float32)
    assert calls == [] and {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before


def test_a_cache_folder_starting_with_a_tilde_is_in_the_home_folder(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    src = tiny_model_dir("llama")
    load_float, _ = counting_loader(src)
    Q.quantized_base(load_float, "int8", cache_dir="~/q8", source=src, dtype=torch.float32)
    assert (tmp_path / "home" / "q8" / Q.META_FILE).is_file() and not (tmp_path / "~").exists()


def test_incomplete_cache_is_refused(tmp_path):
    with pytest.raises(Q.QuantizationError, match="no complete quantized model"):
        Q.load_quantized(tmp_path)
    with pytest.raises(Q.QuantizationError, match="no quantized layers"):
        Q.save_quantized(tiny_base("llama"), tmp_path / "x")


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,limit", [("int8", 0.012), ("int4", 0.10)])
def test_cuda_layer(dtype, mode, limit):
    lin = normal_linear(4096, 1024).to("cuda", dtype)
    q = Q.QuantizedLinear.from_float(lin, mode, 128)
    assert q.qweight.is_cuda
    x = torch.randn(32, 4096, device="cuda", dtype=dtype, requires_grad=True)  # past small_matmul's rows
    y = q(x)
    assert y.dtype == dtype
    assert rel_err(y.detach(), lin(x).detach()) < limit
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    # The fused kernel CUDA uses gives the eager dequantize's output and gradient.
    grad = x.grad.clone()
    x.grad = None
    Q.FUSED_DEQUANTIZE = False
    try:
        y_eager = q(x)
        y_eager.float().square().sum().backward()
    finally:
        Q.FUSED_DEQUANTIZE = True
    errs = rel_err(y.detach(), y_eager.detach()), rel_err(grad, x.grad)
    assert max(errs) < 1e-3, errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode,group,shape", [("int4", 128, (4608, 4096)), ("int4", 32, (40, 100)),
                                              ("int4", 2, (3, 6)), ("int8", 0, (256, 13696)), ("int8", 0, (5, 7))])
def test_cuda_kernel_widens_like_dequantize(dtype, mode, group, shape):
    """ptune.dequant_kernels against the reference dequantize: at most one rounding step apart (the kernel
    may fuse the multiply-add), on layer shapes, odd widths (the padding slice) and the smallest group."""
    from ptune import dequant_kernels

    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0]).to("cuda")
    q = Q.QuantizedLinear.from_float(lin, mode, group or 128)
    args = (q.qweight, q.scale, q.offset, q.in_features, q.group_size, dtype)
    got, want = dequant_kernels.dequantize(*args), Q.dequantize(*args)
    assert got.shape == want.shape == shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,group,shape", [("int4", 128, (4608, 4096)), ("int4", 128, (4096, 13696)),
                                              ("int4", 32, (40, 100)), ("int4", 2, (3, 6)),
                                              ("int8", 0, (256, 13696)), ("int8", 0, (5, 7))])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_small_matmul_is_the_widened_weights_product(dtype, mode, group, shape, rows):
    """dequant_kernels.small_matmul widens in registers what dequantize widens in memory: its output is the
    widened weight's exact product plus the bias rounded once, like cuBLAS's with the widened weight, on
    layer shapes (ChatGLM2-6B's query/key/value and down projections, whose int4 products are split among
    programs), odd widths, the smallest group and several rows."""
    from ptune import dequant_kernels

    torch.manual_seed(0)
    q = Q.QuantizedLinear.from_float(normal_linear(shape[1], shape[0]).to("cuda"), mode, group or 128)
    x = torch.randn(rows, shape[1], device="cuda").to(dtype)
    bias = q.bias.to(dtype) if rows != 3 else None  # both epilogues, without more cases
    assert dequant_kernels.small_matmul_fits(x, q.group_size)
    widened = dequant_kernels.dequantize(q.qweight, q.scale, q.offset, q.in_features, q.group_size, dtype)
    exact = F.linear(x.double(), widened.double(), bias.double() if bias is not None else None)
    got = dequant_kernels.small_matmul(x, q.qweight, q.scale, q.offset, q.in_features, bias)
    assert got.shape == (rows, shape[0]) and got.dtype == dtype
    eps = torch.finfo(dtype).eps  # one rounding of the output is at most eps / 2 of it
    # (cuBLAS may also round partial sums to the half-precision type: allow_bf16_reduced_precision_reduction)
    assert rel_err(got, exact) < eps / 2 and rel_err(F.linear(x, widened, bias), exact) < eps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_split_small_matmul_is_deterministic():
    """A split int4 product is summed by whichever of its programs finishes last, in a fixed order: eager
    calls and CUDA graph replays give the same bits."""
    from ptune import dequant_kernels

    torch.manual_seed(0)
    q = Q.QuantizedLinear.from_float(normal_linear(13696, 4096).to("cuda"), "int4", 128)
    x = torch.randn(1, 13696, device="cuda", dtype=torch.bfloat16)
    args = (q.qweight, q.scale, q.offset, q.in_features, q.bias)
    sms = dequant_kernels._multiprocessors(x.device)
    assert dequant_kernels._splits(sms, 4096 // 128, q.scale.shape[1], 2)[0] > 1  # the split path
    first = dequant_kernels.small_matmul(x, *args)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dequant_kernels.small_matmul(x, *args)  # compiled before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            replayed = dequant_kernels.small_matmul(x, *args)
    for _ in range(20):
        graph.replay()
        assert torch.equal(replayed, first)
        assert torch.equal(dequant_kernels.small_matmul(x, *args), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_layers_route_only_small_half_precision_inputs_to_small_matmul(mode):
    from ptune import dequant_kernels

    q = Q.QuantizedLinear.from_float(normal_linear(512, 256), mode, 128).to("cuda")
    q.bias.data = q.bias.data.to(torch.bfloat16)
    x = torch.randn(2, 3, 512, device="cuda", dtype=torch.bfloat16)  # (batch, tokens, features): 6 rows
    small = dequant_kernels.small_matmul(x.view(6, 512), q.qweight, q.scale, q.offset, 512, q.bias).view(2, 3, 256)
    assert torch.equal(q(x), small)
    for wide in (torch.randn(17, 512, device="cuda", dtype=torch.bfloat16), torch.randn(4, 512, device="cuda")):
        assert not dequant_kernels.small_matmul_fits(wide, q.group_size)
        weight = dequant_kernels.dequantize(q.qweight, q.scale, q.offset, 512, q.group_size, wide.dtype)
        assert torch.equal(q(wide), F.linear(wide, weight, q.bias.to(wide.dtype)))
    assert not dequant_kernels.small_matmul_fits(x, 48)  # tl.arange needs a power of two a half-group


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_quantized_decoding_is_the_same_with_and_without_cuda_graphs():
    """Decoding a quantized base goes through small_matmul, inside the static cache's CUDA graph, in the
    compiled step (generation.compile_step) and in the growing-cache path: all give the same greedy tokens."""
    from ptune.data import left_pad
    from ptune.generate import generate

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("glm", VOCAB)).to("cuda", torch.bfloat16)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)  # peaked logits: no near-ties to flip
    Q.quantize_model(model, "int4", 32)
    prefix = PrefixEncoder(PrefixSpec.for_model(model.config, 4)).to("cuda", torch.bfloat16)
    batch = left_pad([[5, 9, 11, 40, 7], [17, 23], [60, 61, 62]], pad_token_id=0)
    ids, mask = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
    lm = PrefixLM(model, prefix)
    torch._dynamo.reset()
    runs = [generate(lm, ids, mask, max_new_tokens=12, eos_token_ids=[], pad_token_id=0, **options)
            for options in ({"compile_step": True}, {}, {"static_cache": False})]
    assert runs[0].shape == (3, 12) and torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert Q.FUSED_SMALL_MATMUL  # the kernel ran in every path, the compiled one included (no fallback)


def test_small_matmul_falls_back_to_widening_once_the_kernel_fails(monkeypatch, caplog):
    import sys

    import ptune

    import ptune

    monkeypatch.setitem(sys.modules, "ptune.dequant_kernels", None)  # as if triton were missing
    # ... and `from ptune import dequant_kernels` finds the package's attribute first, once anything imported it
    monkeypatch.delattr(ptune, "dequant_kernels", raising=False)
    monkeypatch.delattr(ptune, "dequant_kernels", raising=False)  # an earlier test may have imported it
    monkeypatch.setattr(Q, "FUSED_SMALL_MATMUL", True)
    q = Q.QuantizedLinear.from_float(nn.Linear(64, 8), "int4", 32)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert Q._fused_small_matmul(x, q.qweight, q.scale, q.offset, q.bias, q.in_features, q.group_size) is None
    assert Q.FUSED_SMALL_MATMUL is False
    assert "multiplying small batches by the widened weight from now on: ModuleNotFoundError" in caplog.text


# ---------------------------------------------------------------------------------- python -m ptune.quant_check


def test_quant_check_reports_each_mode_against_the_float_base(tiny_model_dir, sample_file, tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from ptune import quant_check

    model = tiny_model_dir("llama")
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("quant_check", overrides=[
            f"model.path={model}", "model.template=plain", f"data.train_file={sample_file}", "rows=12",
            "batch_size=5", "prefix_length=4", "device=cpu", "modes=[[int8,128],[int4,32]]",
            f"out_json={tmp_path / 'q.json'}"])
    report = quant_check.run(cfg)
    assert report["rows"] == 12 and report["response_tokens"] > 0
    int8, int4 = report["modes"]
    assert (int8["mode"], int8["group_size"], int4["mode"], int4["group_size"]) == ("int8", None, "int4", 32)
    # The tiny random model is easy to quantize: int8 all but reproduces the float base, int4 less so.
    assert int8["prefix_grad_cosine"] > 0.999 and abs(int8["loss_change"]) < 0.01
    assert int8["top1_agreement"] >= 0.95
    assert 0.9 < int4["prefix_grad_cosine"] < int8["prefix_grad_cosine"]
    assert abs(int4["loss_change"]) > abs(int8["loss_change"])
    assert json.loads((tmp_path / "q.json").read_text())["modes"] == report["modes"]


def test_quant_check_reports_the_dtype_of_the_base(tiny_model_dir, sample_file):
    """It said torch.float32 for any base: the gradient it read the dtype from is made float32 first."""
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from ptune import quant_check

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("quant_check", overrides=[
            f"model.path={tiny_model_dir('llama')}", "model.template=plain", "model.dtype=bfloat16",
            f"data.train_file={sample_file}", "rows=2", "batch_size=2", "prefix_length=4", "device=cpu",
            "modes=[[int8,128]]", "out_json=null"])
    assert quant_check.run(cfg)["dtype"] == "torch.bfloat16"
