"""ChatGLM2/3 checkpoints in transformers' GlmForCausalLM, against the original code's outputs.

The reference logits, generations and parameter shapes were recorded from the original ChatGLM3
modeling code by tests/golden/make_chatglm_golden.py on a tiny random ChatGLM2-shaped model whose
weights (reference names, reference config.json) are in tests/golden/chatglm/tiny_chatglm2/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GlmForCausalLM
from transformers.models.glm import modeling_glm

from ptune.chatglm.convert import (
    ChatGLMConversionError,
    convert_state_dict,
    glm_config_from_chatglm,
    load_chatglm,
)
from ptune.models import is_chatglm

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = ROOT / "tests" / "golden" / "chatglm"
TINY = GOLDEN / "tiny_chatglm2"
needs_shared = pytest.mark.skipif(not (SHARED / "chatglm").is_dir(),
                                  reason=f"needs the real ChatGLM configs in {SHARED / 'chatglm'}")


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "tiny_logits.safetensors"))


@pytest.fixture(scope="module")
def tiny_model() -> GlmForCausalLM:
    return load_chatglm(TINY, dtype=torch.float32, verify="size")


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    dst = tmp_path / "tiny"
    shutil.copytree(TINY, dst)
    return dst


def write_bin_shards(src: Path, dst: Path, n_shards: int = 2) -> list[str]:
    """The tiny checkpoint as pytorch_model-0000k-of-0000n.bin shards + index, as the real one ships."""
    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    keys = list(sd)
    per = -(-len(keys) // n_shards)
    names, weight_map = [], {}
    for k in range(n_shards):
        name = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
        part = {key: sd[key] for key in keys[k * per:(k + 1) * per]}
        torch.save(part, dst / name)
        weight_map.update(dict.fromkeys(part, name))
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (dst / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    shutil.copyfile(src / "config.json", dst / "config.json")
    return names


# ----------------------------------------------------------------------------------- config


def test_only_a_chatglm_config_takes_the_conversion_path(tmp_path):
    assert is_chatglm(TINY)
    assert not is_chatglm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_chatglm(tmp_path)
    assert not is_chatglm(tmp_path / "nope")


@needs_shared
@pytest.mark.shared
@pytest.mark.parametrize("name, seq_length", [("chatglm2-6b", 32768), ("chatglm3-6b", 8192)])
def test_real_config_maps_to_glm(name, seq_length):
    cfg = json.loads((SHARED / "chatglm" / name / "config.json").read_text())
    glm = glm_config_from_chatglm(cfg)
    assert (glm.num_hidden_layers, glm.hidden_size, glm.intermediate_size) == (28, 4096, 13696)
    assert (glm.num_attention_heads, glm.num_key_value_heads, glm.head_dim) == (32, 2, 128)
    assert glm.vocab_size == 65024 and glm.max_position_embeddings == seq_length
    assert glm.rope_parameters["partial_rotary_factor"] == 0.5
    assert glm.rope_parameters["rope_theta"] == 10000.0
    assert glm.attention_bias is True and glm.tie_word_embeddings is False
    assert glm.rms_norm_eps == 1e-5 and glm.eos_token_id == 2 and glm.pad_token_id == 0


def test_rope_ratio_scales_the_base():
    cfg = json.loads((TINY / "config.json").read_text())
    assert glm_config_from_chatglm({**cfg, "rope_ratio": 50}).rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize("change, match", [
    ({"quantization_bit": 4}, "int4"),
    ({"add_bias_linear": True}, "add_bias_linear"),
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual"),
    ({"rmsnorm": False}, "rmsnorm"),
])
def test_unsupported_configs_are_refused(change, match):
    cfg = json.loads((TINY / "config.json").read_text())
    with pytest.raises(ChatGLMConversionError, match=match):
        glm_config_from_chatglm({**cfg, **change})


def test_first_generation_chatglm_is_refused():
    v1 = {"model_type": "chatglm", "vocab_size": 130528, "hidden_size": 4096, "num_layers": 28,
          "inner_hidden_size": 16384, "position_encoding_2d": True}
    with pytest.raises(ChatGLMConversionError, match="first-generation"):
        glm_config_from_chatglm(v1)


def _chatglm_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary as ChatGLM2/3 describe it: the first half of each head, interleaved pairs."""
    d = x.shape[-1]
    rot = d // 2
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))  # rot/2 frequencies
    ang = positions[:, None].float() * theta[None, :]  # [seq, rot/2]
    cos, sin = ang.cos()[None, None], ang.sin()[None, None]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([out, x_pass], dim=-1)


@pytest.mark.parametrize("head_dim, rope_ratio", [(128, 1.0), (16, 1.0), (128, 50.0)])
def test_glm_rotary_is_chatglm_rotary(head_dim, rope_ratio):
    cfg = json.loads((TINY / "config.json").read_text())
    cfg.update(kv_channels=head_dim, hidden_size=head_dim * 4, rope_ratio=rope_ratio, seq_length=4096)
    glm = glm_config_from_chatglm(cfg, dtype=torch.float32)
    rotary = modeling_glm.GlmRotaryEmbedding(glm)
    positions = torch.tensor([0, 1, 2, 7, 100, 4000])
    q = torch.randn(1, 4, len(positions), head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary(q, positions[None])
    q_glm, _ = modeling_glm.apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(q_glm, _chatglm_rotary(q, positions, 10000.0 * rope_ratio), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- weights


@needs_shared
@pytest.mark.shared
@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm3-6b"])
def test_real_checkpoint_names_and_shapes_convert(name):
    """Every tensor of the real 6B state dict (names and shapes recorded from the reference code,
    here as meta tensors) lands on a GlmForCausalLM parameter of the same shape, and all are covered."""
    shapes = json.loads((GOLDEN / "real_param_shapes.json").read_text())[name]
    cfg = json.loads((SHARED / "chatglm" / name / "config.json").read_text())
    glm = glm_config_from_chatglm(cfg)
    with torch.device("meta"):
        model = GlmForCausalLM(glm)
        sd = {k: torch.empty(v) for k, v in shapes.items()}
    native = convert_state_dict(sd, glm)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in native.items()} == expected


def test_logits_match_reference(tiny_model, golden):
    with torch.no_grad():
        out = tiny_model(input_ids=golden["plain_input_ids"]).logits
    assert_close_rel(out, golden["plain_logits"])


def test_left_padded_logits_match_reference(tiny_model, golden):
    mask = golden["padded_attention_mask"]
    with torch.no_grad():
        out = tiny_model(input_ids=golden["padded_input_ids"], attention_mask=mask,
                         position_ids=golden["padded_position_ids"]).logits
    real = mask.bool()  # the reference's rows at pad positions are meaningless
    assert_close_rel(out[real], golden["padded_logits"][real])


def test_eager_attention_matches_too(golden):
    model = load_chatglm(TINY, dtype=torch.float32, verify="size", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(input_ids=golden["plain_input_ids"]).logits
    assert_close_rel(out, golden["plain_logits"])


def test_rope_ratio_logits_match(tiny_copy):
    ref = load_file(str(GOLDEN / "tiny_rope_ratio.safetensors"))
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["rope_ratio"] = float(ref["rope_ratio"].item())
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    model = load_chatglm(tiny_copy, dtype=torch.float32, verify="size")
    with torch.no_grad():
        out = model(input_ids=ref["plain_input_ids"]).logits
    assert_close_rel(out, ref["plain_logits"])


def test_greedy_generation_matches_reference(tiny_model, golden):
    prompt = golden["gen_prompt"]
    out = tiny_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.tolist() == golden["gen_output"].tolist()


def test_convert_state_dict_into_a_plain_model(golden):
    cfg = json.loads((TINY / "config.json").read_text())
    glm = glm_config_from_chatglm(cfg, dtype=torch.float32)
    sd = load_file(str(TINY / "model.safetensors"))
    sd["transformer.prefix_encoder.embedding.weight"] = torch.zeros(8, 128)  # skipped, not an error
    model = GlmForCausalLM(glm).eval()
    model.load_state_dict(convert_state_dict(sd, cfg), strict=True)
    with torch.no_grad():
        out = model(input_ids=golden["plain_input_ids"]).logits
    assert_close_rel(out, golden["plain_logits"])
    with pytest.raises(ChatGLMConversionError, match="transformer.bogus.weight"):
        convert_state_dict({**sd, "transformer.bogus.weight": torch.zeros(1)}, glm)


def test_bin_shards_load_identically(tmp_path, tiny_model, golden):
    write_bin_shards(TINY, tmp_path / "bins")
    model = load_chatglm(tmp_path / "bins", dtype=torch.float32, verify="size")
    ref_sd = tiny_model.state_dict()
    sd = model.state_dict()
    assert set(sd) == set(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    with torch.no_grad():
        out = model(input_ids=golden["plain_input_ids"]).logits
    assert_close_rel(out, golden["plain_logits"])


def test_missing_shard_is_named(tmp_path):
    names = write_bin_shards(TINY, tmp_path / "bins")
    (tmp_path / "bins" / names[1]).unlink()
    # ChatGLMConversionError, not FileNotFoundError: the loader's callers report that class in one line.
    with pytest.raises(ChatGLMConversionError, match=f"listed in pytorch_model.bin.index.json are missing: {names[1]}"):
        load_chatglm(tmp_path / "bins", dtype=torch.float32, verify="size")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import save_file

    sd = load_file(str(TINY / "model.safetensors"))
    del sd["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    sd["transformer.encoder.layers.0.extra.weight"] = torch.zeros(2)
    d = tmp_path / "broken"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    shutil.copyfile(TINY / "config.json", d / "config.json")
    with pytest.raises(ChatGLMConversionError) as e:
        load_chatglm(d, dtype=torch.float32, verify="size")
    assert "model.layers.1.mlp.down_proj.weight" in str(e.value)
    assert "transformer.encoder.layers.0.extra.weight" in str(e.value)


def test_config_that_does_not_fit_the_weights(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["ffn_hidden_size"] = 128
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatGLMConversionError, match=r"mlp.*checkpoint tensor has shape"):
        load_chatglm(tiny_copy, dtype=torch.float32, verify="size")


def test_no_remote_code_is_run(tiny_copy, tmp_path):
    marker = tmp_path / "imported"
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        (tiny_copy / name).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    model = load_chatglm(tiny_copy, dtype=torch.float32, verify="size")
    assert isinstance(model, GlmForCausalLM)
    assert not marker.exists()


def test_dtype_and_buffers(tiny_copy):
    model = load_chatglm(tiny_copy, dtype=torch.bfloat16, verify="size")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


# ----------------------------------------------------------------------------------- malformed folders


def test_a_config_with_more_layers_than_the_weights_is_refused_naming_missing_tensors(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["num_layers"] += 2  # the weights hold layers 0 and 1
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatGLMConversionError) as e:
        load_chatglm(tiny_copy, dtype=torch.float32, verify="size")
    message = str(e.value)
    assert message.startswith(f"{tiny_copy} (1 weight file(s)) does not match its config.json: 22 parameter(s)")
    assert "model.layers.2.input_layernorm.weight" in message and "(14 more)" in message
    assert "model.layers.1." not in message


def test_convert_state_dict_refuses_missing_parameters_unless_not_strict():
    sd = load_file(str(TINY / "model.safetensors"))
    cfg = json.loads((TINY / "config.json").read_text())
    del sd["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(ChatGLMConversionError, match=r"1 parameter\(s\) of the config have no tensor: "
                                                      r"model\.layers\.1\.mlp\.down_proj\.weight$"):
        convert_state_dict(sd, cfg)
    assert "model.layers.1.mlp.down_proj.weight" not in convert_state_dict(sd, cfg, strict=False)


@pytest.mark.parametrize("multi_query, groups, layout", [
    (True, 2, "split"), (True, 4, "split"),  # multi-query with as many groups as heads: still split
    (False, 2, "per head"),  # the group count is ignored without the flag
])
def test_fused_query_key_value_rows_are_split_as_the_reference_lays_them_out(multi_query, groups, layout):
    """The reference's SelfAttention splits [all q | all k | all v] under multi_query_attention and views the
    rows per head ([head][q|k|v][dim]) without it, whatever multi_query_group_num says."""
    cfg = {**json.loads((TINY / "config.json").read_text()), "multi_query_attention": multi_query,
           "multi_query_group_num": groups}
    sd = {k: v for k, v in load_file(str(TINY / "model.safetensors")).items() if "query_key_value" not in k}
    heads, dim = cfg["num_attention_heads"], cfg["kv_channels"]
    kv = groups if multi_query else heads
    rows = torch.arange(float((heads + 2 * kv) * dim))[:, None].expand(-1, cfg["hidden_size"]).contiguous()
    for layer in range(cfg["num_layers"]):
        sd[f"transformer.encoder.layers.{layer}.self_attention.query_key_value.weight"] = rows
        sd[f"transformer.encoder.layers.{layer}.self_attention.query_key_value.bias"] = rows[:, 0].clone()
    out = convert_state_dict(sd, cfg)
    q, k, v = (out[f"model.layers.0.self_attn.{n}_proj.weight"][:, 0] for n in "qkv")
    if layout == "split":
        expected = torch.arange(float((heads + 2 * kv) * dim)).split([heads * dim, kv * dim, kv * dim])
    else:
        per_head = torch.arange(float(3 * heads * dim)).reshape(heads, 3, dim)
        expected = tuple(per_head[:, j].reshape(-1) for j in range(3))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), expected))


@pytest.mark.parametrize("content, fault", [
    ("{x", "not valid JSON (Expecting property name"),
    ("[1]", "a JSON list, expected an object"),
    ({"num_layers": "two"}, 'num_layers is "two"; expected a whole number above 0'),
    ({"num_layers": 2.5}, "num_layers is 2.5; expected a whole number above 0"),
    ({"num_layers": True}, "num_layers is true; expected a whole number above 0"),
    ({"hidden_size": 0}, "hidden_size is 0; expected a whole number above 0"),
    ({"kv_channels": None}, "kv_channels is null; expected a whole number above 0"),
    ({"layernorm_epsilon": "1e-5"}, 'layernorm_epsilon is "1e-5"; expected a number from 0 up'),
    ({"rope_ratio": [50]}, "rope_ratio is [50]; expected a number from 0 up"),
], ids=["not-json", "list", "string", "fraction", "bool", "zero", "null", "float-string", "float-list"])
def test_malformed_config_is_refused_naming_the_file_and_field(tiny_copy, content, fault):
    if isinstance(content, dict):
        content = json.dumps({**json.loads((TINY / "config.json").read_text()), **content})
    (tiny_copy / "config.json").write_text(content)
    with pytest.raises(ChatGLMConversionError) as e:
        load_chatglm(tiny_copy, dtype=torch.float32, verify="size")
    assert str(e.value).startswith(f"{tiny_copy / 'config.json'}: ") and fault in str(e.value), str(e.value)


def test_unreadable_weights_are_refused_without_the_check_too(tiny_copy):
    f = tiny_copy / "model.safetensors"
    f.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00["not", "an object"]')
    with pytest.raises(ChatGLMConversionError, match=r"cannot read model\.safetensors: .*verify_model"):
        load_chatglm(tiny_copy, dtype=torch.float32, verify="none")
    f.unlink()
    with pytest.raises(ChatGLMConversionError, match="no weights found"):
        load_chatglm(tiny_copy, dtype=torch.float32, verify="none")
    torch.save([torch.zeros(2)], tiny_copy / "pytorch_model.bin")  # a list, not a state dict
    with pytest.raises(ChatGLMConversionError, match="pytorch_model.bin holds a list, expected a dict of named tensors"):
        load_chatglm(tiny_copy, dtype=torch.float32, verify="none")


def test_a_generation_config_of_another_shape_falls_back_to_config_json(tiny_copy):
    (tiny_copy / "generation_config.json").write_text("[1]")
    model = load_chatglm(tiny_copy, dtype=torch.float32, verify="size")
    assert model.generation_config.eos_token_id == json.loads((TINY / "config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the device the float layers are moved to one at a time"))])
@pytest.mark.parametrize("mode, rel", [("int8", 0.01), ("int4", 0.1)])  # 0.2% and 3.3% on the CPU
def test_a_chatglm_folder_loads_quantized_through_the_converter(golden, device, mode, rel):
    """models.load_model's quantized path: the folder converted in host memory, each linear layer quantized on
    `device`; the logits stay near the reference code's float ones (int4 in groups of 32 is the coarser)."""
    from omegaconf import OmegaConf

    from ptune.models import load_model

    cfg = OmegaConf.create({"path": str(TINY), "dtype": "float32", "attn_implementation": "sdpa",
                            "trust_remote_code": False, "quantization": mode, "quantization_group_size": 32,
                            "quantization_cache": None})
    model = load_model(cfg, device)
    assert model.ptune_quantization["mode"] == mode
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {torch.device(device).type}
    with torch.no_grad():
        out = model(input_ids=golden["plain_input_ids"].to(device)).logits.float().cpu()
    assert_close_rel(out, golden["plain_logits"], rel)
