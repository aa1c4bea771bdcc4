"""Run ChatGLM2-6B / ChatGLM3-6B checkpoints in transformers' own ``GlmForCausalLM``.

No remote code is imported or executed: the published ``config.json`` is read as data, its fields
are mapped onto a ``GlmConfig``, and the weights are renamed and split tensor by tensor.

Architecture correspondence (checked against the original code by tests/test_chatglm_convert.py):

============================================  ==============================================
ChatGLM2/3 (``transformer.`` prefix)          GlmForCausalLM
============================================  ==============================================
``embedding.word_embeddings``                 ``model.embed_tokens``
``encoder.layers.N.input_layernorm``          ``model.layers.N.input_layernorm``
``encoder.layers.N.self_attention.            ``model.layers.N.self_attn.q_proj / k_proj /
query_key_value`` (fused, bias)               v_proj`` (rows split [heads*d | groups*d | groups*d])
``encoder.layers.N.self_attention.dense``     ``model.layers.N.self_attn.o_proj``
``encoder.layers.N.post_attention_layernorm`` ``model.layers.N.post_attention_layernorm``
``encoder.layers.N.mlp.dense_h_to_4h``        ``model.layers.N.mlp.gate_up_proj`` (same layout:
                                              first half gate -> silu, second half up)
``encoder.layers.N.mlp.dense_4h_to_h``        ``model.layers.N.mlp.down_proj``
``encoder.final_layernorm``                   ``model.norm``
``output_layer``                              ``lm_head`` (not tied)
``rotary_pos_emb.inv_freq``                   dropped (recomputed from the config)
============================================  ==============================================

Rotary embedding: ChatGLM2/3 rotate only the first half of every head (``kv_channels // 2``
dims) in interleaved pairs ``(x[2i], x[2i+1])`` with frequencies ``base ** (-2i / (head_dim/2))``,
``base = 10000 * rope_ratio`` (``rope_ratio`` exists only in the long-context variants' configs).
That is exactly GLM's rotary in transformers with ``partial_rotary_factor=0.5`` and
``rope_theta = 10000 * rope_ratio``.  ``multi_query_group_num`` is the number of key/value heads
(grouped-query attention); ``kv_channels`` is ``head_dim``.  ``apply_query_key_layer_scaling``
changes nothing numerically (it divides and multiplies by the same layer number), so it is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import GlmConfig, GlmForCausalLM

from ptune.chatglm import integrity
from ptune.files import read_json_object

log = logging.getLogger(__name__)

__all__ = [
    "ChatGLMConversionError",
    "read_chatglm_config",
    "config_number",
    "glm_config_from_chatglm",
    "convert_state_dict",
    "convert_tensor",
    "qkv_per_head",
    "weight_files",
    "load_chatglm",
]

_IGNORED_SUFFIXES = ("rotary_pos_emb.inv_freq",)
_PREFIX_ENCODER = "transformer.prefix_encoder."


class ChatGLMConversionError(ValueError):
    """A ChatGLM folder or state dict that cannot be turned into a GlmForCausalLM."""


# ----------------------------------------------------------------------------------- config


def read_chatglm_config(path: str | os.PathLike) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ChatGLMConversionError(f"no config.json in {path}")
    return read_json_object(cfg_file, ChatGLMConversionError)


def config_number(cfg: dict, key: str, default=None, integer: bool = True):
    """``cfg[key]`` (``default`` where absent or null): a whole number above 0, or with ``integer=False`` any
    number from 0 up; anything else is refused naming the field, where int() or float() would take 8.5 or "8"."""
    value = cfg.get(key)
    if value is None:
        value = default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < (1 if integer else 0):
        raise ChatGLMConversionError(f"{key} is {json.dumps(value)}; expected "
                                     f"{'a whole number above 0' if integer else 'a number from 0 up'}")
    return value if integer else float(value)


def _require(cfg: dict, key: str, wanted, why: str) -> None:
    have = cfg.get(key, wanted)
    if have != wanted:
        raise ChatGLMConversionError(f"ChatGLM config has {key}={have!r}; only {wanted!r} is supported ({why})")


def glm_config_from_chatglm(cfg: dict, dtype: torch.dtype | str | None = None) -> GlmConfig:
    """The ``GlmConfig`` of the same network as a ChatGLM2/3 ``config.json`` (a dict)."""
    if "padded_vocab_size" not in cfg or "kv_channels" not in cfg:
        if "position_encoding_2d" in cfg or "inner_hidden_size" in cfg:
            raise ChatGLMConversionError(
                "this is a first-generation ChatGLM-6B config (2D positions, GLM-130B style blocks); only "
                "ChatGLM2-6B / ChatGLM3-6B (and GLM-4-9B with the same code) can be converted")
        raise ChatGLMConversionError("not a ChatGLM2/3 config: padded_vocab_size / kv_channels missing")
    if cfg.get("quantization_bit", 0):
        raise ChatGLMConversionError(
            f"quantization_bit={cfg['quantization_bit']}: the -int4/-int8 checkpoints store packed integer weights; "
            "use the full-precision checkpoint")
    _require(cfg, "rmsnorm", True, "GLM uses RMSNorm")
    _require(cfg, "post_layer_norm", True, "GLM has a final norm")
    _require(cfg, "apply_residual_connection_post_layernorm", False, "GLM adds the residual before the norm")
    _require(cfg, "add_bias_linear", False, "GLM's output and MLP projections have no bias")
    _require(cfg, "fp32_residual_connection", False, "not representable in GLM")

    num_heads = config_number(cfg, "num_attention_heads")
    head_dim = config_number(cfg, "kv_channels")
    kv_heads = config_number(cfg, "multi_query_group_num", 1) if cfg.get("multi_query_attention", False) else num_heads
    if num_heads % kv_heads:
        raise ChatGLMConversionError(f"num_attention_heads={num_heads} is not a multiple of multi_query_group_num={kv_heads}")
    rope_ratio = config_number(cfg, "rope_ratio", 1.0, integer=False) or 1.0
    eos = cfg.get("eos_token_id", 2)
    if dtype is None:
        dtype = cfg.get("torch_dtype", "float16")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return GlmConfig(
        vocab_size=config_number(cfg, "padded_vocab_size"),
        hidden_size=config_number(cfg, "hidden_size"),
        intermediate_size=config_number(cfg, "ffn_hidden_size"),
        num_hidden_layers=config_number(cfg, "num_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        attention_dropout=config_number(cfg, "attention_dropout", 0.0, integer=False),
        max_position_embeddings=config_number(cfg, "seq_length", 2048),
        rms_norm_eps=config_number(cfg, "layernorm_epsilon", 1e-5, integer=False),
        use_cache=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * rope_ratio, "partial_rotary_factor": 0.5},
        pad_token_id=cfg.get("pad_token_id", 0),
        eos_token_id=eos,
        bos_token_id=None,
        attention_bias=bool(cfg.get("add_qkv_bias", False)),
        dtype=dtype,
        architectures=["GlmForCausalLM"],
    )


# ----------------------------------------------------------------------------------- weights


def _qkv_sizes(config: GlmConfig) -> list[int]:
    d = config.head_dim
    return [config.num_attention_heads * d, config.num_key_value_heads * d, config.num_key_value_heads * d]


def _split_qkv(tensor: torch.Tensor, config: GlmConfig, per_head: bool) -> tuple[torch.Tensor, ...]:
    sizes = _qkv_sizes(config)
    if tensor.shape[0] != sum(sizes):
        raise ChatGLMConversionError(
            f"query_key_value has {tensor.shape[0]} rows, the config implies {sum(sizes)} "
            f"({config.num_attention_heads} heads + 2 x {config.num_key_value_heads} key/value groups of {config.head_dim})")
    if per_head:
        # Without multi-query attention the fused rows are laid out per head: [head][q|k|v][dim].
        h, d = config.num_attention_heads, config.head_dim
        per_head = tensor.reshape(h, 3, d, *tensor.shape[1:])
        return tuple(per_head[:, j].reshape(h * d, *tensor.shape[1:]).contiguous() for j in range(3))
    return tuple(t.contiguous() for t in torch.split(tensor, sizes, dim=0))


_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_PREFIX = "transformer.encoder.layers."


def qkv_per_head(chatglm_config: dict) -> bool:
    """How a ChatGLM config's fused query_key_value rows are laid out: per head ([head][q|k|v][dim]) without
    multi-query attention, else [all q | all k | all v], whatever the number of groups (the reference's
    SelfAttention branches on the flag alone)."""
    return not chatglm_config.get("multi_query_attention", False)


def convert_tensor(name: str, tensor: torch.Tensor, config: GlmConfig,
                   per_head_qkv: bool | None = None) -> list[tuple[str, torch.Tensor]] | None:
    """Native ``(name, tensor)`` pairs for one ChatGLM parameter; ``[]`` for one that is dropped,
    ``None`` for a name that is not a ChatGLM2/3 parameter at all. ``per_head_qkv``: the ChatGLM config's
    ``not multi_query_attention`` (see qkv_per_head); None guesses it from ``config``, which cannot tell
    multi-query attention with as many groups as heads from none."""
    if name in _TOP_MAP:
        return [(_TOP_MAP[name], tensor)]
    if name.endswith(_IGNORED_SUFFIXES):
        return []
    if name.startswith(_LAYER_PREFIX):
        idx, _, rest = name[len(_LAYER_PREFIX):].partition(".")
        if not idx.isdigit():
            return None
        base = f"model.layers.{idx}."
        if rest in _LAYER_MAP:
            return [(base + _LAYER_MAP[rest], tensor)]
        if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            per_head = per_head_qkv
            if per_head is None:
                per_head = config.num_key_value_heads == config.num_attention_heads
            q, k, v = _split_qkv(tensor, config, per_head)
            return [(f"{base}self_attn.q_proj.{kind}", q), (f"{base}self_attn.k_proj.{kind}", k),
                    (f"{base}self_attn.v_proj.{kind}", v)]
    return None


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: GlmConfig | dict,
                       strict: bool = True) -> dict[str, torch.Tensor]:
    """A ChatGLM2/3 state dict (reference names) as a ``GlmForCausalLM`` state dict.

    ``config`` is the ``GlmConfig`` (or the ChatGLM config dict).  P-tuning prefix encoder weights
    (``transformer.prefix_encoder.*``) are not part of the base model and are skipped with a warning.
    With ``strict``, unknown names and parameters of the config that no tensor gives raise, listing them.
    """
    per_head = qkv_per_head(config) if isinstance(config, dict) else None
    if isinstance(config, dict):
        config = glm_config_from_chatglm(config)
    out: dict[str, torch.Tensor] = {}
    unexpected, prefix = [], []
    for name, tensor in state_dict.items():
        if name.startswith(_PREFIX_ENCODER):
            prefix.append(name)
            continue
        pairs = convert_tensor(name, tensor, config, per_head)
        if pairs is None:
            unexpected.append(name)
            continue
        out.update(pairs)
    if prefix:
        log.warning("skipped %d P-tuning prefix encoder tensors in the base checkpoint (%s ...); a prefix is "
                    "loaded from a ptune checkpoint, not from the base", len(prefix), prefix[0])
    if strict:
        with torch.device("meta"):
            expected = {n for n, _ in GlmForCausalLM(config).named_parameters()}
        _refuse_mismatch("the ChatGLM state dict", sorted(expected - set(out)), unexpected)
    return out


def _refuse_mismatch(where: str, missing: list[str], unexpected: list[str]) -> None:
    """Refuse weights that leave parameters of the config unset (they would stay random) or carry unknown ones."""
    def some(names: list[str]) -> str:
        # A config of another model size misses hundreds of names; a few are enough to recognise which.
        names = sorted(names)
        return ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) of the config have no tensor: {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) are not ChatGLM2/3 parameters: {some(unexpected)}")
    if parts:
        raise ChatGLMConversionError(f"{where} does not match its config.json: " + "; ".join(parts))


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a ChatGLM folder, in load order.  Raises naming any shard an index lists
    but the folder lacks (ChatGLMConversionError) and an index of another shape (IntegrityError)."""
    path = Path(path)
    for index_name in integrity.INDEX_FILES:
        index_file = path / index_name
        if index_file.is_file():
            names = sorted(set(integrity.read_weight_map(index_file).values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise ChatGLMConversionError(
                    f"{path}: shard(s) listed in {index_name} are missing: {', '.join(missing)}. "
                    "Download them into the folder (all shards are needed).")
            return [path / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if shards:
        return shards
    raise ChatGLMConversionError(f"{path}: no weights found (model.safetensors, pytorch_model.bin, or an index with "
                                 "shards)")


def _iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one weight file; a .bin shard is memory-mapped, so only what is used gets read."""
    damaged = f". The file may be damaged: run `python -m ptune.verify_model {file.parent} --full`"
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError) as e:  # reached with verify="none", which skips the header check
            raise ChatGLMConversionError(f"cannot read {file.name}: {e}{damaged}") from None
        return
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise ChatGLMConversionError(f"cannot read {file.name}: {e}{damaged}") from None
        sd = torch.load(str(file), map_location="cpu", weights_only=True)  # old (non-zip) serialisation
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything
        raise ChatGLMConversionError(f"cannot read {file.name}: {e}{damaged}") from None
    if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
        raise ChatGLMConversionError(f"{file.name} holds a {type(sd).__name__}, expected a dict of named tensors")
    try:
        yield from sd.items()
    finally:
        del sd


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(leaf)
    if old is None:
        raise ChatGLMConversionError(f"{name} is not a parameter of GlmForCausalLM")
    if tuple(old.shape) != tuple(tensor.shape):
        raise ChatGLMConversionError(f"{name}: checkpoint tensor has shape {tuple(tensor.shape)}, the config "
                                     f"implies {tuple(old.shape)}")
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def _generation_eos(path: Path, cfg: dict):
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        try:
            gen = json.loads(gen_file.read_text(encoding="utf-8"))
        except ValueError:
            gen = None
        eos = gen.get("eos_token_id") if isinstance(gen, dict) else None  # an unusable file: config.json's
        if eos is not None:
            return eos
    return cfg.get("eos_token_id", 2)


def load_chatglm(
    path: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    *,
    verify: str = integrity.DEFAULT_LEVEL,
    attn_implementation: str | None = None,
) -> GlmForCausalLM:
    """A ``GlmForCausalLM`` holding the weights of a ChatGLM2/3 folder (``.bin`` or safetensors,
    one file or shards).

    The model is built on the meta device and every converted tensor is materialised (cast to
    ``dtype``, moved to ``device``) as its shard is read, so host memory peaks at about one shard
    beyond the model.

    ``dtype`` is a resolved ``torch.dtype``: ``model.dtype=auto`` is settled by
    :func:`ptune.models.resolve_dtype` (by device) before this is called, the same rule as for any
    other base, so the checkpoint's own ``torch_dtype`` (float16 for chatglm2-6b) never decides it.

    ``verify`` is the integrity check run first (see :mod:`ptune.chatglm.integrity`): ``"size"``,
    ``"first-use"`` (default: SHA-256 of files with a published hash, once; remembered by size and
    mtime), ``"full"`` or ``"none"``.
    """
    path = Path(path)
    cfg = read_chatglm_config(path)
    device = torch.device(device)

    files = weight_files(path)
    if verify != "none":
        integrity.verify_dir(path, level=verify, raise_on_error=True)
    try:
        config = glm_config_from_chatglm(cfg, dtype=dtype)
    except ChatGLMConversionError as e:
        raise ChatGLMConversionError(f"{path / 'config.json'}: {e}") from None
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    expected = {n for n, _ in model.named_parameters()}
    loaded: set[str] = set()
    unexpected: list[str] = []
    prefix_keys = 0
    for file in files:
        for name, tensor in _iter_file(file):
            if name.startswith(_PREFIX_ENCODER):
                prefix_keys += 1
                continue
            pairs = convert_tensor(name, tensor, config, qkv_per_head(cfg))
            if pairs is None:
                unexpected.append(f"{name} ({file.name})")
                continue
            for native, t in pairs:
                if native in loaded:
                    raise ChatGLMConversionError(f"{native} appears twice (second time from {name} in {file.name})")
                try:
                    _set_tensor(model, native, t.to(device=device, dtype=dtype, copy=True))
                except ChatGLMConversionError as e:
                    raise ChatGLMConversionError(f"{name} in {file.name} -> {e}; does config.json belong to "
                                                 "these weights?") from None
                loaded.add(native)
            del tensor, pairs
    _refuse_mismatch(f"{path} ({len(files)} weight file(s))", sorted(expected - loaded), unexpected)
    if prefix_keys:
        log.warning("skipped %d P-tuning prefix encoder tensors in %s", prefix_keys, path)

    # Non-persistent buffers (the rotary frequencies) were created on the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.generation_config.eos_token_id = _generation_eos(path, cfg)
    model.generation_config.pad_token_id = cfg.get("pad_token_id", 0)
    model.generation_config.bos_token_id = None
    model.eval()
    log.info("converted %s to GlmForCausalLM in %.1fs", path, time.perf_counter() - t0)
    return model
