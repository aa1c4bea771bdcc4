"""Load a frozen base model and its tokenizer from a local folder, and put a prefix in front of it.

`load_for_inference(checkpoint)` is the one way evaluate, sweep, chat and serve get a tuned model:
base + prefix, checked against each other.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from ptune import checkpoint as ckpt_io
from ptune.chatglm import ptuning
from ptune.errors import ModelError, first_line
from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec, attention_shape
from ptune.settings import DEFAULT_GROUP_SIZE, model_folder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ModelError(f"model.dtype={name!r}: expected auto, float32, bfloat16 or float16")
    return DTYPES[name]


def is_chatglm(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "chatglm"
    except (ValueError, AttributeError) as e:
        raise ModelError(f"model.path={path}: {cfg.name} is not a JSON object ({e})") from None


def load_tokenizer(path: str | Path):
    path = Path(path)
    if (path / "tokenizer.model").is_file() and (is_chatglm(path) or not (path / "tokenizer_config.json").is_file()):
        from ptune.chatglm.tokenizer import load_tokenizer as load_chatglm_tokenizer

        try:
            return load_chatglm_tokenizer(path)
        except RuntimeError as e:  # sentencepiece's parse failure: a damaged or cut-short file
            raise ModelError(f"model.path={path}: tokenizer.model is not a readable SentencePiece model ({e}); "
                             "the file is damaged or incomplete, copy it again") from None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"model.path={path}: no usable tokenizer in the folder ({e})") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{path}: the tokenizer defines no EOS token; ptune appends EOS to every response")
    if tok.pad_token_id is None:
        # Padding positions are masked out everywhere, so any id works; EOS is always in the vocabulary.
        tok.pad_token = tok.eos_token
    return tok


def load_base(model_cfg, device: torch.device | str = "cpu"):
    """(model, tokenizer) from `model_cfg.path`, frozen, in eval mode, on `device`. The tokenizer first: it
    loads in seconds, and a folder without a usable one fails before the model's minutes."""
    tokenizer = load_tokenizer(model_folder(model_cfg))
    model = load_model(model_cfg, device)
    check_vocabulary(model, tokenizer, model_cfg.path)
    return model, tokenizer


def check_vocabulary(model, tokenizer, path) -> None:
    """Refuse a tokenizer with ids past the model's embedding table: they would fail only at the first
    batch that holds one, as an IndexError on the CPU and a device-side assert on a GPU."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(f"model.path={path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding "
                         f"has {rows} rows, so ids {rows} to {len(tokenizer) - 1} have no embedding; the tokenizer "
                         "files belong to another model (or tokens were added without resizing the embedding)")


def load_model(model_cfg, device: torch.device | str = "cpu"):
    """The base model of `model_cfg.path` alone, frozen, in eval mode, on `device`."""
    device = torch.device(device)
    path = model_folder(model_cfg)
    dtype = resolve_dtype(str(model_cfg.dtype), device)

    def load_float(device: torch.device = device):
        if is_chatglm(path):
            from ptune.chatglm.convert import ChatGLMConversionError, load_chatglm
            from ptune.chatglm.integrity import IntegrityError

            try:
                model = load_chatglm(path, dtype=dtype, device=device)
            except (ChatGLMConversionError, IntegrityError) as e:  # a damaged download or an unsupported config
                raise ModelError(f"model.path={path}: {e}") from None
            model.set_attn_implementation(model_cfg.attn_implementation)
            return model
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        # Into a pipe or a log file the loading bar is carriage returns, not progress anyone watches.
        bar_was_on = hf_logging.is_progress_bar_enabled()
        if not sys.stderr.isatty():
            hf_logging.disable_progress_bar()
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=model_cfg.attn_implementation, local_files_only=True,
                trust_remote_code=bool(model_cfg.trust_remote_code), output_loading_info=True,
            )
        except (OSError, ValueError, SafetensorError, RuntimeError) as e:  # RuntimeError: a tensor of another shape
            raise ModelError(f"model.path={path}: could not load the model: {e}") from None
        except ImportError as e:  # an attention implementation (or model code) whose package is not installed
            raise ModelError(f"model.path={path}: could not load the model with model.attn_implementation="
                             f"{model_cfg.attn_implementation}: {e}") from None
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        check_weights_match(path, loading)
        return model.to(device)

    quant = model_cfg.get("quantization")
    try:
        if quant:
            from ptune.quant import quantized_base

            cache = model_cfg.get("quantization_cache")
            if cache and Path(str(cache)).expanduser().resolve() == path.resolve():
                # The cache writes its own config.json: over the base's, every later load would build the wrong
                # model.
                raise ModelError(f"model.quantization_cache={cache}: that is the base model's own folder "
                                 "(model.path); give the quantized copy a folder of its own")
            group_size = int(model_cfg.get("quantization_group_size") or DEFAULT_GROUP_SIZE)
            # The float model stays in host memory; its layers reach the device one at a time, so a base that
            # only fits the device quantized still loads.
            model = quantized_base(lambda: load_float(torch.device("cpu")), str(quant), group_size,
                                   cache_dir=model_cfg.get("quantization_cache"), source=path, dtype=dtype,
                                   device=device, attn_implementation=model_cfg.attn_implementation)
        else:
            model = load_float()
    except torch.OutOfMemoryError as e:
        smaller = {None: ["model.quantization=int8 or int4"], "int8": ["model.quantization=int4"]}.get(quant or None,
                                                                                                     [])
        smaller += ["model.dtype=bfloat16"] if dtype == torch.float32 else []
        raise ModelError(f"model.path={path}: the model does not fit in the memory of {device} "
                         f"({first_line(e)}); free the device's memory"
                         + (f", load it smaller ({', '.join(smaller)})" if smaller else "")
                         + ", or use a device with more memory") from None
    model.requires_grad_(False)
    model.eval()
    if model_cfg.get("fused_layers", True):  # on unless a config says off; older checkpoints do not say
        from ptune.layers import fuse_layers

        fuse_layers(model)
    return model


def check_weights_match(path: Path, info: dict) -> None:
    """Refuse a folder whose weights do not fit its config.json. transformers fills missing tensors with
    random values and drops unexpected ones with a warning (tensors of another shape it refuses itself), and
    training or scoring would go on with a model that is not the one on disk."""
    for key, what in (("missing_keys", "the config asks for but the weights lack (they would start random)"),
                      ("unexpected_keys", "are in the weights but not in the model config.json describes "
                                          "(they would be dropped)")):
        names = sorted(info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ModelError(f"model.path={path}: its weights do not match its config.json: {len(names)} "
                             f"tensor(s) {what}: {shown}. Check config.json's sizes (num_hidden_layers, "
                             f"hidden_size, ...) against the weight files, or download the folder again")


# Config keys that bound a model's positions (prompt + reply tokens), the first one present counting:
# past it, learned position tables (GPT-2's n_positions) fail with an IndexError mid-generation.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "seq_length")


def position_limit(model) -> tuple[int, str] | None:
    """(positions, config key) of the model's position limit, or None where its config states none. The key is the
    one its config.json spells (GPT-2's n_positions, which transformers also answers to as max_position_embeddings)."""
    config = model.config.get_text_config()
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, getattr(config, "attribute_map", {}).get(key, key)
    return None


def learned_positions(model) -> int | None:
    """How many positions the base's learned position table holds (GPT-2's wpe, OPT's embed_positions), or None
    for rotary and ALiBi bases, which have no table to index past: past its end a row is not merely out of
    the base's training range, the embedding lookup fails (a device-side assert on a GPU)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    words = model.get_input_embeddings()
    for m in model.modules():
        # OPT's table holds two more rows than it has positions (an offset), hence the small range
        if isinstance(m, torch.nn.Embedding) and m is not words and limit <= m.num_embeddings <= limit + 2:
            return limit
    return None


def resolve_checkpoint(path: str) -> str:
    """`path`, or for a run folder (no prefix_config.json of its own) its newest complete checkpoint."""
    if (Path(path) / ckpt_io.CONFIG_FILE).is_file() or ptuning.is_reference_checkpoint(path):
        return path
    if not Path(path).is_dir():
        found = "a file, not a folder" if Path(path).exists() else "no such folder"
        raise ckpt_io.CheckpointError(f"checkpoint={path}: {found}")
    newest = ckpt_io.latest_checkpoint(path)
    if newest is None:
        raise ckpt_io.CheckpointError(f"checkpoint={path}: expected a checkpoint folder (with {ckpt_io.CONFIG_FILE}) "
                                      "or a run folder with a complete checkpoint-N; found neither")
    log.info("%s is a run folder: using its newest complete checkpoint, %s", path, newest.name)
    return str(newest)


def build_prefix(model, prefix_cfg, device: torch.device) -> PrefixEncoder:
    """A new prefix for `model` on `device`, checked first against all of that device's memory: an absurd
    prefix.length or projection size would otherwise end in an allocator traceback, or on a machine that
    overcommits memory in the out-of-memory killer's silent exit."""
    spec = PrefixSpec.for_model(model.config, int(prefix_cfg.length), bool(prefix_cfg.projection),
                                prefix_cfg.projection_hidden_size)
    with torch.device("meta"):  # counted from the module itself, without allocating it
        params = sum(p.numel() for p in PrefixEncoder(spec).parameters())
    need, have = 16 * params, device_memory(device)  # fp32 weights, gradients and Adam's two moments
    if need > have:
        where = "this machine's memory" if device.type == "cpu" else f"the GPU ({device})"
        sizes = f"prefix.length={spec.length}" + (
            f", prefix.projection_hidden_size={spec.projection_hidden_size}" if spec.projection else "")
        raise ModelError(f"{sizes}: this prefix has {params:,} parameters, which take {need / 2**30:,.1f} GiB to "
                         f"train (fp32 weights, gradients and Adam's state), more than all "
                         f"{have / 2**30:,.1f} GiB of {where}")
    return PrefixEncoder(spec, dropout=float(prefix_cfg.dropout)).to(device)


def device_memory(device: torch.device) -> int:
    """Bytes of memory `device` has in all (a GPU's, or the machine's RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def base_identity(model, path) -> dict:
    """What a checkpoint records about its base, to refuse a base it does not fit."""
    cfg = model.config.get_text_config()
    return {"path": str(path), "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, **attention_shape(cfg)}


def check_fits(prefix_config: dict, model, where: str) -> None:
    """Raise naming both sides when a checkpoint's prefix does not fit the base model's attention layers."""
    spec = prefix_config["prefix"]
    have = attention_shape(model.config)
    wanted = {k: spec[k] for k in ("num_layers", "num_kv_heads", "head_dim")}
    mismatch = {k: (wanted[k], have[k]) for k in wanted if wanted[k] != have[k]}
    if mismatch:
        detail = ", ".join(f"{k}: checkpoint {a} vs base {b}" for k, (a, b) in mismatch.items())
        trained_on = prefix_config.get("base", {}).get("path", "?")
        raise ckpt_io.CheckpointError(f"{where}: prefix does not fit the base model ({detail}); it was trained on "
                                      f"{trained_on}")
    base = prefix_config.get("base", {})
    if base.get("model_type") not in (None, model.config.get_text_config().model_type):
        log.warning("%s was trained on a %s model, loading into a %s model of the same shape", where,
                    base.get("model_type"), model.config.get_text_config().model_type)


def read_checkpoint_config(checkpoint) -> dict:
    """The prefix_config of a ptune checkpoint, or the equivalent of a ChatGLM2/3 P-tuning folder's config.json."""
    if ptuning.is_reference_checkpoint(checkpoint):
        return ptuning.reference_prefix_config(checkpoint)
    return ckpt_io.read_prefix_config(checkpoint)


def prefix_weights(checkpoint, config: dict) -> dict:
    """The prefix tensors of a ptune checkpoint or a ChatGLM P-tuning folder, as its config describes them."""
    if config.get("format") == ptuning.FORMAT:
        return ptuning.load_reference_weights(Path(checkpoint), PrefixSpec(**config["prefix"]))
    return ckpt_io.load_prefix_weights(checkpoint)


def attach_checkpoint(model, checkpoint, prefix_lm: PrefixLM | None = None, config: dict | None = None,
                      weights: dict | None = None) -> PrefixLM:
    """A PrefixLM for `model` with the checkpoint's prefix; reuses `prefix_lm` when only weights change.

    `checkpoint` is a ptune checkpoint or a folder saved by ChatGLM2-6B's P-tuning scripts; `config` its
    :func:`read_checkpoint_config` and `weights` its :func:`prefix_weights`, where the caller has read them.
    """
    checkpoint = Path(checkpoint)
    config = config or read_checkpoint_config(checkpoint)
    check_fits(config, model, str(checkpoint))
    spec = PrefixSpec(**config["prefix"])
    weights = weights if weights is not None else prefix_weights(checkpoint, config)
    if prefix_lm is None or prefix_lm.prefix.spec != spec:
        prefix_lm = PrefixLM(model, PrefixEncoder(spec).to(next(model.parameters()).device))
    expected = set(prefix_lm.prefix.state_dict())
    if set(weights) != expected:
        raise ckpt_io.CheckpointError(f"{checkpoint}: prefix tensors {sorted(weights)} do not match the prefix spec "
                                      f"{sorted(expected)}")
    for name, tensor in prefix_lm.prefix.state_dict().items():
        if weights[name].shape != tensor.shape:
            raise ckpt_io.CheckpointError(f"{checkpoint}: {name} has shape {tuple(weights[name].shape)}, the prefix "
                                          f"spec needs {tuple(tensor.shape)}")
    prefix_lm.prefix.load_state_dict(weights)
    prefix_lm.eval()
    return prefix_lm


def inference_model_settings(prefix_config: dict | None, overrides: dict) -> dict:
    """Model settings for inference: what the checkpoint recorded, overridden by non-null `overrides`."""
    recorded = dict(prefix_config["model"]) if prefix_config else {}
    if prefix_config:
        recorded["path"] = prefix_config["base"]["path"]
    return {**recorded, **{k: v for k, v in overrides.items() if v is not None}}


def base_identity_settings(settings: dict, device: torch.device) -> dict:
    """The model settings that decide which base gets loaded, resolved (the folder, `auto` dtype): two
    checkpoints with equal ones share a loaded base, and scores made with other ones are not reused."""
    quant = settings.get("quantization") or None  # false (a float base whatever was recorded) is null here
    return {"path": str(Path(str(settings["path"])).expanduser().resolve()),
            "dtype": str(resolve_dtype(str(settings.get("dtype", "auto")), device)),
            "attn_implementation": settings.get("attn_implementation"),
            "trust_remote_code": bool(settings.get("trust_remote_code")),
            "quantization": quant,
            "quantization_group_size": int(settings.get("quantization_group_size") or DEFAULT_GROUP_SIZE) if quant
                                       else None,
            "fused_layers": bool(settings.get("fused_layers", True))}


def load_for_inference(checkpoint, model_cfg=None, device="cpu", config: dict | None = None):
    """(PrefixLM or bare base, tokenizer, prefix_config) for a checkpoint; `checkpoint=None` gives the base alone.

    The model settings are the ones the checkpoint recorded, overridden by the non-null values of
    `model_cfg` (e.g. `model.path` when the base has moved); `config` is the checkpoint's
    :func:`read_checkpoint_config`, where the caller has read it already.
    """
    from omegaconf import OmegaConf

    if checkpoint and config is None:
        config = read_checkpoint_config(checkpoint)
    overrides = OmegaConf.to_container(model_cfg) if model_cfg is not None else {}
    merged = OmegaConf.create(inference_model_settings(config, overrides))
    if merged.get("path") is None and config:
        raise ModelError(f"{checkpoint} does not record its base model's folder (a ChatGLM P-tuning checkpoint "
                         "keeps only the prefix); pass model.path=/path/to/chatglm2-6b")
    if merged.get("path") is None:
        raise ModelError("no checkpoint and no model.path: nothing to load")
    recorded = Path(str(merged.path)).expanduser()
    if config and overrides.get("path") is None and not recorded.is_dir():
        relative = "" if recorded.is_absolute() else f", relative to the folder training ran in, not {Path.cwd()}"
        raise ModelError(f"{checkpoint}: its base model folder {merged.path} (recorded when it was trained"
                         f"{relative}) is not there; pass model.path=<the base model's folder>")
    # The prefix is read before the base's minutes of loading: a run still training may prune this checkpoint
    # (keep_last) meanwhile.
    weights = prefix_weights(checkpoint, config) if checkpoint else None
    model, tokenizer = load_base(merged, device)
    if checkpoint is None:
        return model, tokenizer, None
    return attach_checkpoint(model, checkpoint, config=config, weights=weights), tokenizer, config
