"""What each command refuses in its settings: values their types allow but no run could use (a learning rate of 0,
a batch of -1, an eval file that is not there), each named with the value given and what was expected.

Light on purpose (no torch, no transformers): `python -m ptune.<command>` runs the command's check from here before
it imports the command's module (ptune.command), so a mistyped value is refused in a fraction of a second rather
than after those imports' seconds. The commands' own entry functions (ptune.train.train, ptune.evaluate.evaluate,
...) call the same checks, for callers that compose a config themselves.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, ListConfig, OmegaConf

from ptune.errors import ConfigError, DataError, ModelError, QuantizationError, TrainingError
from ptune.quickstart import DEFAULT_MODEL_DIR

if TYPE_CHECKING:
    import torch

# The choices a setting names, here so that checking them needs none of the modules that implement them.
TEMPLATES = ("chatglm2", "chat_template", "plain")  # ptune.data's prompt formats
MODES = ("int8", "int4")
# int4's group size where no setting names one: a base quantized alone for inference (checkpoint=null, whose
# model.quantization_group_size is null). Training takes conf/model/*.yaml's, the same value.
DEFAULT_GROUP_SIZE = 128
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
API_KEY_ENV = "PTUNE_API_KEY"


# ---------------------------------------------------------------------------------------------- one value

def require(cfg: DictConfig, *keys: str) -> None:
    """Fail before any heavy work when a value the run needs is unset."""
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or value == "":
            raise ConfigError(f"{key} is not set; pass {key}=... on the command line")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_count(cfg: DictConfig, key: str, least: int = 1, nullable: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if (value is None and nullable) or (_whole(value) and value >= least):
        return
    null = " or null" if nullable else ""
    raise ConfigError(f"{key}={value!r}: expected a whole number of at least {least}{null}")


def check_above_zero(cfg: DictConfig, key: str, what: str, nullable: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if (value is None and nullable) or (_number(value) and value > 0):
        return
    null = ", or null" if nullable else ""
    raise ConfigError(f"{key}={value!r}: expected {what}, a number above 0{null}")


def check_in_range(cfg: DictConfig, key: str, expected: str, least: float = 0, below: float = math.inf) -> None:
    """A number from `least` up to (not) `below`; NaN, infinity and true/false are refused too."""
    value = OmegaConf.select(cfg, key)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and least <= value < below):
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def check_flag(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")


def check_batch_size(cfg: DictConfig, key: str = "batch_size") -> None:
    if OmegaConf.select(cfg, key) != "auto":
        check_count(cfg, key)


def check_token_ids(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not (isinstance(value, ListConfig) and all(_whole(t) and t >= 0 for t in value)):
        raise ConfigError(f"{key}={value!r}: expected a list of token ids (whole numbers >= 0), e.g. [2] or []")


def check_sampling(cfg: DictConfig, temperature_key: str, top_p_key: str, sampling: bool = True) -> None:
    """A temperature above 0 where sampling, top_p within [0, 1] (0 keeps only the likeliest token)."""
    t, p = OmegaConf.select(cfg, temperature_key), OmegaConf.select(cfg, top_p_key)
    if not _number(t) or (sampling and t <= 0):
        raise ConfigError(f"{temperature_key}={t!r}: expected a number" + (" above 0 when sampling; greedy decoding "
                                                                           "is do_sample=false" if sampling else ""))
    if not (_number(p) and 0 <= p <= 1):
        raise ConfigError(f"{top_p_key}={p!r}: expected a number from 0 to 1")


def check_generation(cfg: DictConfig, key: str = "generation") -> None:
    """The generation group (conf/generation/): how many tokens, greedy or sampled, extra stop tokens."""
    check_count(cfg, f"{key}.max_new_tokens")
    check_flag(cfg, f"{key}.do_sample")
    check_flag(cfg, f"{key}.compile_step")
    check_count(cfg, f"{key}.seed", least=0)
    check_sampling(cfg, f"{key}.temperature", f"{key}.top_p", sampling=OmegaConf.select(cfg, f"{key}.do_sample"))
    check_token_ids(cfg, f"{key}.extra_eos_token_ids")


def check_data_lengths(cfg: DictConfig, nullable: bool = False) -> None:
    """Length limits and which end of a long prompt is cut (evaluate's null keeps the checkpoint's)."""
    for key in ("data.max_source_length", "data.max_target_length"):
        check_count(cfg, key, nullable=nullable)
    side = cfg.data.truncate_source_from
    if not (side in ("left", "right") or (nullable and side is None)):
        raise ConfigError(f"data.truncate_source_from={side!r}: expected right (keep a long prompt's start) or left "
                          "(keep its end)")


def check_quantization(cfg: DictConfig, inference: bool = False) -> None:
    """model.quantization: null or a mode of MODES; the inference entry points also take false,
    which loads a float base for a checkpoint that trained on a quantized one."""
    mode = cfg.model.get("quantization")
    if mode is None or (inference and mode is False):
        return
    check_mode(mode, cfg.model.get("quantization_group_size") or DEFAULT_GROUP_SIZE)


def check_inference_model(cfg: DictConfig) -> None:
    """The `model` overrides of evaluate, sweep, chat and serve (null: the checkpoint's). trust_remote_code and
    fused_layers are checked as flags: a typo such as `ture` is refused, not read as true -- least of all for running
    code shipped with the weights."""
    check_quantization(cfg, inference=True)
    check_flag(cfg, "model.trust_remote_code")
    if cfg.model.get("fused_layers") is not None:
        check_flag(cfg, "model.fused_layers")
    check_template(cfg, nullable=True)


def check_template(cfg: DictConfig, nullable: bool = False) -> None:
    """model.template names a prompt format ptune has (null, where allowed: the checkpoint's, or for a bare base
    the tokenizer's chat template)."""
    value = cfg.model.get("template")
    if not (value in TEMPLATES or (nullable and value is None)):
        raise ConfigError(f"model.template={value!r}: expected one of {', '.join(TEMPLATES)}"
                          + (" (or null)" if nullable else ""))


_DEVICE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def check_device(cfg: DictConfig, key: str = "device") -> re.Match:
    """`auto`, `cpu`, `cuda` or `cuda:N` (whether this machine has it: resolve_device)."""
    form = _DEVICE.fullmatch(str(cfg[key]))
    if not form:
        raise ConfigError(f"{key}={str(cfg[key])!r}: expected auto, cpu, cuda or cuda:N")
    return form


def resolve_device(value, key: str = "device") -> torch.device:
    """`auto` (the GPU when there is one), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    import torch  # here, not at the top: the other checks run before torch is imported

    name = str(value)
    form = check_device({key: name}, key)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu":
        count = torch.cuda.device_count()
        if not count:
            raise ConfigError(f"{key}={name}: no CUDA device on this machine; use cpu or auto")
        if int(form.group(1) or 0) >= count:
            raise ConfigError(f"{key}={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device(name)


def model_folder(model_cfg) -> Path:
    """`model_cfg.path`, checked to be a model folder before anything is loaded from it."""
    path = Path(str(model_cfg.path)).expanduser()
    if path.is_file():
        raise ModelError(f"model.path={path}: a file, not a folder; point model.path at the model's folder "
                         "(config.json + weights + tokenizer)")
    if not path.is_dir():
        made_by = (" It is the built-in default model, a folder relative to where you run: "
                   "`python -m ptune.quickstart prepare-model` makes it here (`bash recipes/quickstart.sh` makes it "
                   "in the repository's folder, for commands run from there)." if path == DEFAULT_MODEL_DIR else "")
        raise ModelError(f"model.path={path}: no such folder. Point model.path at a local model folder "
                         f"(config.json + weights + tokenizer); ptune downloads nothing at run time.{made_by}")
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path={path}: no config.json in it; expected a transformers model folder")
    return path


def data_file(path: str | Path, setting: str | None = None) -> Path:
    """`path` (~ expanded), checked to be a file before anything is read from it; `setting` names the key that
    gave it."""
    path = Path(path).expanduser()
    if not path.is_file():
        where = f"{setting}={path}" if setting else str(path)
        raise DataError(f"{where}: " + ("a folder, expected a data file (JSON lines or a JSON array)" if path.is_dir()
                                        else "no such file"))
    return path


def check_mode(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise QuantizationError(f"quantization={mode!r}: expected one of {', '.join(MODES)} (or null)")
    if mode == "int4" and (int(group_size) < 2 or int(group_size) % 2):
        raise QuantizationError(f"quantization group size {group_size}: int4 needs an even group size >= 2 "
                                "(two 4-bit values are packed per byte)")


def check_writable(folder: Path, setting: str | None) -> None:
    """Refuse a results folder that cannot be written, before anything is generated: the results are written
    last, and a failure there would lose the whole generation. Nothing is created: a run refused or stopped
    later leaves no empty folder behind. `setting` names the config key that chose the folder, None where it is
    the default."""
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the nearest folder that is there: makedirs starts there
        probe = probe.parent
    why = None if probe.is_dir() else "not a folder"
    if why is None and not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only"
    if why is None:
        return
    if setting:
        raise ConfigError(f"{setting}={folder}: cannot write there, {probe} is {why}; expected a folder that can be "
                          "written")
    raise ConfigError(f"cannot write the results to {folder}: {probe} is {why}; pass output_dir=<a folder that can "
                      "be written>")


def api_key_of(cfg: DictConfig) -> str | None:
    """The key every request must send: api_key, else the environment's PTUNE_API_KEY; None: no key."""
    return cfg.get("api_key") or os.environ.get(API_KEY_ENV) or None


def check_api_key(cfg: DictConfig) -> None:
    key = cfg.get("api_key")
    if key is not None and not isinstance(key, str):
        # Turned into text it would be another key than the one typed: requests sending that one would fail.
        what = {bool: "true/false", int: "a number", float: "a number"}.get(type(key), "a list or mapping")
        raise ConfigError(f"api_key is {what}, not text: the command line reads an unquoted key like 1e5 or true as "
                          "a value (1e5 would become the key 100000.0); quote it: 'api_key=\"<key>\"' (or set "
                          f"{API_KEY_ENV})")
    if key == "":
        # `api_key=$KEY` with KEY unset: without this the server would run with no key at all, unasked.
        raise ConfigError("api_key is empty, which would serve without a key; give the key, or api_key=null "
                          "(the default) to serve without one")
    key = api_key_of(cfg)
    if key is None:
        return
    setting = "api_key" if cfg.get("api_key") else API_KEY_ENV
    if not key.isascii():
        raise ConfigError(f"{setting} holds characters outside ASCII, which requests cannot send reliably: the key "
                          "travels in an HTTP header, read here as latin-1, and clients encode such characters in "
                          "different ways or refuse them; use an ASCII key")
    # Refused rather than stripped: a secret silently made into another one would surprise whoever chose it.
    for end, char in (("begins", key[0]), ("ends", key[-1])):
        if char.isspace():
            hint = " (a key read from a file may keep its line ending)" if char in "\r\n" else ""
            raise ConfigError(f"{setting} {end} with whitespace ({char!r}), which HTTP strips from the ends of a "
                              f"header, so no request can match it; remove it{hint}")
    # A header's value may hold a tab, no other control character (RFC 9110, field-content).
    control = next((c for c in key if (c < " " and c != "\t") or c == "\x7f"), None)
    if control is not None:
        raise ConfigError(f"{setting} holds a control character ({control!r}), which an HTTP header cannot carry, so "
                          "no request can send this key")


def check_cors_origins(cfg: DictConfig) -> None:
    """cors_origins: a list of origins as a browser sends them (scheme://host[:port], no path), or "*"."""
    origins = cfg.get("cors_origins")
    if origins is None:
        return
    if not OmegaConf.is_list(origins) and not isinstance(origins, list):
        raise ConfigError(f"cors_origins={origins!r}: expected a list, e.g. 'cors_origins=[\"http://localhost:3000\"]'")
    for i, origin in enumerate(origins):
        if origin == "*":
            continue
        if not isinstance(origin, str) or re.fullmatch(r"https?://[^/\s?#]+", origin) is None:
            raise ConfigError(f"cors_origins[{i}]={origin!r}: expected an origin as a browser sends it, "
                              "scheme://host[:port] with no path or trailing slash (e.g. http://localhost:3000), "
                              "or \"*\" for any")


def check_names(cfg: DictConfig) -> None:
    """user_name and assistant_name label every turn: a word, not null, a list or blank."""
    for key in ("user_name", "assistant_name"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
            raise ConfigError(f"{key}={value!r}: expected a name to label the turns with, e.g. {key}=Ann")


def _model_to_load(cfg: DictConfig, base_alone: str) -> None:
    if not cfg.checkpoint and not cfg.model.get("path"):
        raise ConfigError("pass checkpoint=<run>/checkpoint-N (or a run folder: its newest checkpoint), or "
                          f"checkpoint=null model.path=<dir> to {base_alone}")


# ---------------------------------------------------------------------------------------------- each command

def train(cfg: DictConfig) -> None:
    """conf/train.yaml: values the types allow but the trainer cannot use, refused before anything is loaded or
    written."""
    require(cfg, "model.path", "data.train_file")
    t = cfg.trainer
    for key in ("max_steps", "save_steps", "log_steps", "per_device_batch_size", "gradient_accumulation_steps",
                "pad_to_multiple_of", "loss_chunk_size", "cuda_graph_shapes"):
        check_count(cfg, f"trainer.{key}")
    check_count(cfg, "trainer.group_by_length", least=0)
    check_count(cfg, "trainer.keep_last", nullable=True)
    check_count(cfg, "prefix.length")
    check_quantization(cfg)
    check_template(cfg)
    if cfg.optim.schedule not in ("linear", "constant"):
        raise TrainingError(f"optim.schedule={cfg.optim.schedule!r}: expected linear or constant")
    o = cfg.optim
    # Each written as "not (ok)" so that NaN, which fails every comparison, is refused too.
    for key, value, ok, expected in (
            ("optim.lr", o.lr, 0 < o.lr < math.inf, "a finite number above 0"),
            ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, "a whole number of at least 0"),
            ("prefix.dropout", cfg.prefix.dropout, 0 <= cfg.prefix.dropout < 1, "a number from 0 up to (not) 1"),
            ("optim.eps", o.eps, 0 < o.eps < math.inf, "a finite number above 0"),
            ("optim.weight_decay", o.weight_decay, 0 <= o.weight_decay < math.inf, "a finite number of at least 0"),
            ("optim.max_grad_norm", o.max_grad_norm, o.max_grad_norm is None or 0 <= o.max_grad_norm < math.inf,
             "a finite number of at least 0 (0 or null: no clipping)")):
        if not ok:
            raise TrainingError(f"{key}={value}: expected {expected}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise TrainingError(f"optim.betas={list(o.betas)}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    check_count(cfg, "prefix.projection_hidden_size", nullable=True)
    if not 0 <= cfg.seed < 2**32:  # the per-step dropout seeds add to it and must stay within 64 bits
        raise TrainingError(f"seed={cfg.seed}: expected a whole number from 0 to 2**32 - 1")
    check_data_lengths(cfg)
    check_above_zero(cfg, "trainer.auto_micro_batch_gib", "a memory ceiling in GiB (null keeps the micro-batch as set)",
                     nullable=True)
    recompute = t.gradient_checkpointing
    if not (isinstance(recompute, bool) or recompute == "auto" or (isinstance(recompute, int) and recompute >= 0)):
        raise TrainingError(f"trainer.gradient_checkpointing={recompute!r}: expected true, false, auto or a number of "
                            "decoder layers to recompute")
    if recompute == "auto" and t.auto_micro_batch_gib is None:
        raise TrainingError("trainer.gradient_checkpointing=auto chooses how many layers to recompute under a "
                            "memory ceiling: set trainer.auto_micro_batch_gib too, or give true, false or a "
                            "number of layers")
    model_folder(cfg.model)
    data_file(cfg.data.train_file, "data.train_file")

def _scoring(cfg: DictConfig) -> None:
    """conf/evaluate.yaml's settings, which conf/sweep.yaml shares."""
    check_device(cfg)
    check_batch_size(cfg)
    check_count(cfg, "limit", nullable=True)
    check_generation(cfg)
    check_data_lengths(cfg, nullable=True)
    check_inference_model(cfg)
    if cfg.data.eval_file is not None:
        data_file(cfg.data.eval_file, "data.eval_file")


# What a checkpoint records and the base model alone (checkpoint=null) does not.
BASE_ALONE_SETTINGS = ("data.prompt_column", "data.response_column", "data.max_source_length",
                       "data.max_target_length", "model.template")


def evaluate(cfg: DictConfig) -> None:
    """conf/evaluate.yaml."""
    _scoring(cfg)
    require(cfg, "data.eval_file")  # a checkpoint records its columns and lengths, never the file to score
    missing = [k for k in BASE_ALONE_SETTINGS if OmegaConf.select(cfg, k) is None] if cfg.checkpoint is None else []
    if missing:
        raise ConfigError(f"checkpoint=null evaluates the base model alone, which records no data settings: pass "
                          f"{', '.join(k + '=...' for k in missing)} (AdvertiseGen: data.prompt_column=content "
                          "data.response_column=summary data.max_source_length=64 data.max_target_length=128)")


def sweep(cfg: DictConfig) -> None:
    """conf/sweep.yaml."""
    _scoring(cfg)
    check_flag(cfg, "force")
    check_flag(cfg, "progress_bar")


def chat(cfg: DictConfig) -> None:
    """conf/chat.yaml."""
    _model_to_load(cfg, "chat with the base model alone")
    check_count(cfg, "max_prompt_tokens")
    check_flag(cfg, "show_prompt")
    check_names(cfg)
    check_generation(cfg)
    check_inference_model(cfg)
    check_device(cfg)


def serve(cfg: DictConfig) -> None:
    """conf/serve.yaml's limits and request defaults, refused before the model loads or the port opens."""
    _model_to_load(cfg, "serve the base model alone")
    check_device(cfg)
    for key in ("max_prompt_tokens", "max_new_tokens", "max_batch_size", "max_body_bytes", "max_queue",
                "api.max_length", "openai.max_tokens"):
        check_count(cfg, key)
    check_count(cfg, "batch_wait_ms", least=0)
    check_above_zero(cfg, "body_timeout_s", "the seconds a request body may take to arrive")
    check_above_zero(cfg, "shutdown_timeout_s", "the seconds a stopping server waits for its connections to close")
    check_count(cfg, "seed", least=0)
    host = cfg.host
    if not isinstance(host, str) or not host.strip():
        # `host=$HOST` with HOST unset: bind() would take "" as every interface, the server open to the network.
        raise ConfigError(f"host={host!r}: expected the address to listen on (127.0.0.1, the default, for this "
                          "machine alone; 0.0.0.0 for every interface)")
    name = cfg.get("model_name")
    if name is not None and not isinstance(name, str):  # typed unquoted, 2024 is a number; OpenAI's ids are text
        raise ConfigError(f"model_name={name!r}: expected text, the model's id in the API; quote it: "
                          "'model_name=\"<name>\"'")
    if not (isinstance(cfg.port, int) and not isinstance(cfg.port, bool) and 0 <= cfg.port <= 65535):
        raise ConfigError(f"port={cfg.port!r}: expected a TCP port from 0 to 65535 (0: any free port)")
    if str(cfg.log_level) not in LOG_LEVELS:
        raise ConfigError(f"log_level={cfg.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    for group in ("api", "openai"):  # a temperature <= 0 asks for greedy decoding here
        check_sampling(cfg, f"{group}.temperature", f"{group}.top_p", sampling=False)
    check_token_ids(cfg, "generation.extra_eos_token_ids")
    check_inference_model(cfg)
    check_api_key(cfg)
    check_cors_origins(cfg)

def bench(cfg: DictConfig) -> None:
    """conf/bench.yaml's settings no run could use, refused before the model is built (the device's own limits:
    ptune.bench.bench_device)."""
    check_device(cfg)
    for key in ("fused_layers", "fused_dequantize", "fused_small_matmul", "widen_timing", "gradient_checkpointing", "compile", "cuda_graphs"):
        check_flag(cfg, key)
    for key in ("prefix_length", "max_source_length", "max_target_length", "num_rows", "steps", "loss_chunk_size",
                "eval_prompts", "eval_new_tokens", "pad_to_multiple_of", "graphs_pad_to_multiple_of",
                "quantization_group_size", "eval_prompts_at_batch1"):
        check_count(cfg, key)
    for key in ("seed", "warmup_steps", "eval_check_prompts", "adgen_group_by_length"):
        check_count(cfg, key, least=0)
    for key in ("train_settings", "adgen_settings"):
        for i, pair in enumerate(cfg[key]):
            if not (isinstance(pair, ListConfig) and len(pair) == 2):
                raise ConfigError(f"{key}[{i}]={pair!r}: expected [micro-batch, accumulation steps], e.g. [16, 1]")
            check_count(cfg, f"{key}[{i}][0]")
            check_count(cfg, f"{key}[{i}][1]")
    for key in ("eval_batches", "eval_sampled_batches", "decode_steady_batches", "decode_compile_batches"):
        for i in range(len(cfg[key])):
            check_count(cfg, f"{key}[{i}]")
    check_sampling(cfg, "eval_sampling.temperature", "eval_sampling.top_p")
    steady = cfg.decode_steady_tokens
    if not (isinstance(steady, ListConfig) and len(steady) == 2):
        raise ConfigError(f"decode_steady_tokens={steady!r}: expected [fewer, more] new tokens, e.g. [16, 144]")
    check_count(cfg, "decode_steady_tokens[0]")
    check_count(cfg, "decode_steady_tokens[1]")
    if steady[1] <= steady[0]:
        raise ConfigError(f"decode_steady_tokens={list(steady)}: expected more new tokens second than first (a step's "
                          "time is the difference over the extra steps)")
    check_above_zero(cfg, "lr", "the learning rate of ptune's optimizer and PEFT's Trainer")
    check_in_range(cfg, "weight_decay", "AdamW's weight decay, a finite number of at least 0")
    check_in_range(cfg, "max_grad_norm", "a finite number of at least 0 (0: no clipping)")
    check_in_range(cfg, "prefix_dropout", "a number from 0 up to (not) 1", below=1)
    if any(c != "peft" for c in cfg.compare):
        raise ConfigError(f"compare={list(cfg.compare)!r}: expected [peft], or [] to time ptune alone")
    check_above_zero(cfg, "peak_tflops", "the card's dense bf16 peak in TFLOP/s")
    check_above_zero(cfg, "auto_micro_batch_gib", "a memory ceiling in GiB", nullable=True)
    if not isinstance(cfg.load_timing, ListConfig):
        raise ConfigError(f"load_timing={cfg.load_timing!r}: expected a list of modes, e.g. [false, int4] ([] to skip)")
    for i, mode in enumerate(cfg.load_timing):
        if mode not in (False, None, "int8", "int4"):
            raise ConfigError(f"load_timing[{i}]={mode!r}: expected false (not quantized), int8 or int4")
    if cfg.quantization is not None:
        check_mode(cfg.quantization, cfg.quantization_group_size)
    for key in ("out_json", "benchmarks_md"):  # written after the whole run: a bad path would lose every number
        if cfg[key]:
            path = Path(str(cfg[key])).expanduser()
            check_writable(path.parent, key)
            if path.is_dir():
                raise ConfigError(f"{key}={cfg[key]}: a folder, expected the path of a file to write")


def quant_check(cfg: DictConfig) -> None:
    """Settings no measurement could use, refused before the float base loads (the quantized loads come after
    it, and the report is written last)."""
    require(cfg, "model.path", "data.train_file")
    check_device(cfg)
    for key in ("rows", "batch_size", "prefix_length", "loss_chunk_size"):
        check_count(cfg, key)
    check_template(cfg)
    check_data_lengths(cfg)
    modes = cfg.modes
    if not isinstance(modes, ListConfig) or not modes:
        raise ConfigError(f"modes={modes!r}: expected a list of [mode, int4 group size] pairs, e.g. [[int8, 128]]")
    for i, pair in enumerate(modes):
        if not (isinstance(pair, ListConfig) and len(pair) == 2 and isinstance(pair[1], int)
                and not isinstance(pair[1], bool)):
            raise ConfigError(f"modes[{i}]={OmegaConf.to_object(pair) if isinstance(pair, ListConfig) else pair!r}: "
                              "expected [mode, int4 group size], e.g. [int8, 128] or [int4, 32]")
        mode, group = pair
        if mode not in MODES:
            raise ConfigError(f"modes[{i}]: {mode!r} is no quantization mode; expected one of {', '.join(MODES)}")
        try:
            check_mode(mode, group)
        except QuantizationError as e:
            raise ConfigError(f"modes[{i}]: {e}") from None
    if cfg.out_json:
        check_writable(Path(str(cfg.out_json)).expanduser().parent, "out_json")
        if Path(str(cfg.out_json)).expanduser().is_dir():
            raise ConfigError(f"out_json={cfg.out_json}: a folder, expected the path of a JSON file to write")

# ptune.command's table: the check each command's settings go through before its module is imported.
COMMANDS = {"train": train, "evaluate": evaluate, "sweep": sweep, "chat": chat, "serve": serve, "bench": bench,
            "quant_check": quant_check}
