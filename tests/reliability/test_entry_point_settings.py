"""Settings that no run could use are refused before a model loads, naming the key, the value given and what
was expected: the training config's data and optimizer values, and the inference, serving and benchmark
entry points' settings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO
import ptune.schema  # noqa: F401 -- registers the training config's types
from ptune import bench, settings
from ptune.config import asset_path
from ptune.settings import resolve_device
from ptune.errors import ConfigError, DataError, QuantizationError, TrainingError

# What each command needs set before its values are looked at; the checks never open these paths (but the eval file).
NEEDED = {"train": ["model.path=/nonexistent/model", "data.train_file=/nonexistent/train.jsonl"],
          "evaluate": ["checkpoint=/nonexistent/checkpoint-1", f"data.eval_file={asset_path('adgen_sample.jsonl')}"],
          "serve": ["checkpoint=/nonexistent/checkpoint-1"],
          "quant_check": ["model.path=/nonexistent/model", "data.train_file=/nonexistent/train.jsonl"]}


def composed(name: str, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=NEEDED.get(name, []) + list(overrides))


REFUSED = [  # (config, overrides, what the message says)
    # conf/train.yaml
    ("train", "data.max_source_length=0", "data.max_source_length=0: expected a whole number of at least 1"),
    ("train", "data.max_target_length=-1", "data.max_target_length=-1: expected a whole number of at least 1"),
    ("train", "data.truncate_source_from=middle",
     "data.truncate_source_from='middle': expected right (keep a long prompt's start) or left (keep its end)"),
    ("train", "trainer.max_steps=0", "trainer.max_steps=0: expected a whole number of at least 1"),
    ("train", "trainer.keep_last=0", "trainer.keep_last=0: expected a whole number of at least 1 or null"),
    ("train", "prefix.length=0", "prefix.length=0: expected a whole number of at least 1"),
    ("train", "prefix.projection_hidden_size=0",
     "prefix.projection_hidden_size=0: expected a whole number of at least 1 or null"),
    ("train", "optim.betas=[0.9]", "optim.betas=[0.9]: expected two numbers in [0, 1)"),
    ("train", "optim.betas=[1.5,0.9]", "optim.betas=[1.5, 0.9]: expected two numbers in [0, 1)"),
    ("train", "optim.eps=0", "optim.eps=0.0: expected a finite number above 0"),
    ("train", "optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0: expected a finite number of at least 0 (0 or null: "
                                        "no clipping)"),
    ("train", "optim.max_grad_norm=nan", "optim.max_grad_norm=nan: expected a finite number of at least 0"),
    ("train", "optim.weight_decay=inf", "optim.weight_decay=inf: expected a finite number of at least 0"),
    ("train", "optim.lr=inf", "optim.lr=inf: expected a finite number above 0"),
    ("train", "optim.lr=nan", "optim.lr=nan: expected a finite number above 0"),
    ("train", "optim.lr=-1", "optim.lr=-1.0: expected a finite number above 0"),
    ("train", "optim.warmup_steps=-1", "optim.warmup_steps=-1: expected a whole number of at least 0"),
    ("train", "prefix.dropout=1", "prefix.dropout=1.0: expected a number from 0 up to (not) 1"),
    ("train", "seed=99999999999999999999", "seed=99999999999999999999: expected a whole number from 0 to 2**32 - 1"),
    ("train", "seed=-1", "seed=-1: expected a whole number from 0"),
    # conf/evaluate.yaml
    ("evaluate", "batch_size=0", "batch_size=0: expected a whole number of at least 1"),
    ("evaluate", "batch_size=many", "batch_size='many': expected a whole number of at least 1"),
    ("evaluate", "limit=0", "limit=0: expected a whole number of at least 1 or null"),
    ("evaluate", "generation.max_new_tokens=0", "generation.max_new_tokens=0: expected a whole number of at least"),
    ("evaluate", "generation.max_new_tokens=abc", "generation.max_new_tokens='abc': expected a whole number"),
    ("evaluate", "generation.do_sample=maybe", "generation.do_sample='maybe': expected true or false"),
    ("evaluate", "generation.top_p=2", "generation.top_p=2: expected a number from 0 to 1"),
    ("evaluate", "generation.extra_eos_token_ids=[eos]",
     "generation.extra_eos_token_ids=['eos']: expected a list of token ids"),
    ("evaluate", "generation.extra_eos_token_ids=7", "generation.extra_eos_token_ids=7: expected a list of token"),
    ("evaluate", "data.max_source_length=0",
     "data.max_source_length=0: expected a whole number of at least 1 or null"),
    ("evaluate", "data.truncate_source_from=middle", "data.truncate_source_from='middle': expected right"),
    ("evaluate", "data.eval_file=/nowhere/dev.jsonl", "data.eval_file=/nowhere/dev.jsonl: no such file"),
    ("evaluate", "data.eval_file=/tmp", "data.eval_file=/tmp: a folder, expected a data file"),
    ("evaluate", "model.quantization=int3", "quantization='int3': expected one of int8, int4 (or null)"),
    ("evaluate", "model.trust_remote_code=ture", "model.trust_remote_code='ture': expected true or false"),
    ("evaluate", "model.fused_layers=maybe", "model.fused_layers='maybe': expected true or false"),
    ("train", "model.quantization=int2", "quantization='int2': expected one of int8, int4 (or null)"),
    ("train", "model.template=chatglm3", "model.template='chatglm3': expected one of chatglm2, chat_template, plain"),
    ("train", "model.template=null", "model.template=None: expected one of chatglm2, chat_template, plain"),
    ("evaluate", "model.template=Plain", "model.template='Plain': expected one of chatglm2, chat_template, plain (or"),
    ("serve", "model.template=chat", "model.template='chat': expected one of"),
    ("serve", "model.quantization=int4 model.quantization_group_size=3", "group size 3: int4 needs an even group"),
    # conf/serve.yaml
    ("serve", "port=70000", "port=70000: expected a TCP port from 0 to 65535"),
    ("serve", "host=", "host='': expected the address to listen on"),  # `host=$HOST`, HOST unset: every interface
    ("serve", "host=null", "host=None: expected the address to listen on"),
    ("serve", "model_name=2024", "model_name=2024: expected text, the model's id in the API; quote it"),
    ("serve", "max_batch_size=0", "max_batch_size=0: expected a whole number of at least 1"),
    ("serve", "batch_wait_ms=-1", "batch_wait_ms=-1: expected a whole number of at least 0"),
    ("serve", "cors_origins=[http://localhost:3000/]", "cors_origins[0]='http://localhost:3000/': expected an origin"),
    ("serve", "cors_origins=localhost", "cors_origins='localhost': expected a list"),
    ("serve", "body_timeout_s=0", "body_timeout_s=0: expected the seconds a request body may take to arrive, a number"),
    ("serve", "shutdown_timeout_s=0", "shutdown_timeout_s=0: expected"),
    ("serve", "model.trust_remote_code=yes", "model.trust_remote_code='yes': expected true or false"),
    ("serve", "log_level=loud", "log_level='loud': expected one of critical, error, warning, info, debug"),
    ("serve", "api.top_p=1.5", "api.top_p=1.5: expected a number from 0 to 1"),
    ("serve", "openai.temperature=hot", "openai.temperature='hot': expected a number"),
    ("serve", "openai.max_tokens=0", "openai.max_tokens=0: expected a whole number of at least 1"),
    # conf/quant_check.yaml
    ("quant_check", "modes=[int8]", "modes[0]='int8': expected [mode, int4 group size], e.g. [int8, 128]"),
    ("quant_check", "modes=[]", "modes=[]: expected a list of [mode, int4 group size] pairs"),
    ("quant_check", "modes=[[int3,128]]", "modes[0]: 'int3' is no quantization mode; expected one of int8, int4"),
    ("quant_check", "modes=[[int8,128],[int4,3]]", "modes[1]: quantization group size 3: int4 needs an even group"),
    ("quant_check", "model.template=chatglm3", "model.template='chatglm3': expected one of chatglm2, chat_template"),
    ("quant_check", "data.truncate_source_from=middle", "data.truncate_source_from='middle': expected right"),
    ("quant_check", "data.max_source_length=0", "data.max_source_length=0: expected a whole number of at least 1"),
    ("quant_check", "out_json=/etc/hostname/r.json", "out_json=/etc/hostname: cannot write there, /etc/hostname is "
                                                     "not a folder"),
    ("quant_check", "out_json=/tmp", "out_json=/tmp: a folder, expected the path of a JSON file to write"),
    # conf/bench.yaml
    ("bench", "gradient_checkpointing=some", "gradient_checkpointing='some': expected true or false"),
    ("bench", "train_settings=[[0,1]]", "train_settings[0][0]=0: expected a whole number of at least 1"),
    ("bench", "train_settings=[16]", "train_settings[0]=16: expected [micro-batch, accumulation steps]"),
    ("bench", "adgen_settings=[[16,1,2]]", "adgen_settings[0]=[16, 1, 2]: expected [micro-batch, accumulation"),
    ("bench", "eval_batches=[1,0]", "eval_batches[1]=0: expected a whole number of at least 1"),
    ("bench", "compare=[hf]", "compare=['hf']: expected [peft], or [] to time ptune alone"),
    ("bench", "quantization=int3", "quantization='int3': expected one of int8, int4 (or null)"),
    ("bench", "quantization=int4 quantization_group_size=3", "quantization group size 3: int4 needs an even group"),
    ("bench", "peak_tflops=0", "peak_tflops=0: expected the card's dense bf16 peak in TFLOP/s, a number above 0"),
    ("bench", "device=gpu", "device='gpu': expected auto, cpu, cuda or cuda:N"),
    ("bench", "out_json=tests", "out_json=tests: a folder, expected the path of a file to write"),
    ("bench", "benchmarks_md=README.md/B.md", "benchmarks_md=README.md: cannot write there, README.md is not a folder"),
    ("bench", "auto_micro_batch_gib=0", "auto_micro_batch_gib=0: expected a memory ceiling in GiB, a number above 0, "
                                        "or null"),
    ("bench", "lr=0", "lr=0: expected the learning rate of ptune's optimizer and PEFT's Trainer, a number above 0"),
    ("bench", "lr=nan", "lr=nan: expected the learning rate of ptune's optimizer and PEFT's Trainer"),
    ("bench", "weight_decay=-0.1", "weight_decay=-0.1: expected AdamW's weight decay, a finite number of at least 0"),
    ("bench", "max_grad_norm=inf", "max_grad_norm=inf: expected a finite number of at least 0 (0: no clipping)"),
    ("bench", "max_grad_norm=true", "max_grad_norm=True: expected a finite number of at least 0"),
    ("bench", "prefix_dropout=1", "prefix_dropout=1: expected a number from 0 up to (not) 1"),
    ("bench", "prefix_dropout=-0.1", "prefix_dropout=-0.1: expected a number from 0 up to (not) 1"),
    ("bench", "pad_to_multiple_of=0", "pad_to_multiple_of=0: expected a whole number of at least 1"),
    ("bench", "decode_steady_tokens=[16]", "decode_steady_tokens=[16]: expected [fewer, more] new tokens, e.g. [16, 144]"),
    ("bench", "decode_steady_tokens=[0,16]", "decode_steady_tokens[0]=0: expected a whole number of at least 1"),
    ("bench", "decode_steady_tokens=[144,16]", "decode_steady_tokens=[144, 16]: expected more new tokens second than first"),
]


@pytest.mark.parametrize("config, override, message", REFUSED)
def test_refused(config, override, message):
    with pytest.raises((ConfigError, DataError, QuantizationError, TrainingError)) as refused:
        settings.COMMANDS[config](composed(config, *override.split()))
    assert message in str(refused.value)


def test_sampling_needs_a_temperature_above_zero_greedy_does_not():
    with pytest.raises(ConfigError, match=r"generation.temperature=0: expected a number above 0 when sampling"):
        settings.evaluate(composed("evaluate", "generation=reference_sampling", "generation.temperature=0"))
    settings.evaluate(composed("evaluate", "generation.temperature=0"))  # greedy ignores it
    settings.evaluate(composed("evaluate", "generation=reference_sampling", "batch_size=4", "limit=3",
                                     "generation.extra_eos_token_ids=[2,5]", "data.max_target_length=64"))


@pytest.mark.parametrize("experiment", ["quickstart", "adgen_60steps", "adgen_3000steps", "adgen_smollm2"])
def test_shipped_experiments_pass_the_checks(experiment, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model folder, as far as the checks look
    settings.train(composed("train", f"+experiment={experiment}", "optim.max_grad_norm=0", f"model.path={tmp_path}",
                            f"data.train_file={asset_path('adgen_sample.jsonl')}"))


def test_serve_takes_its_defaults_and_greedy_temperatures():
    settings.serve(composed("serve"))
    settings.serve(composed("serve", "openai.temperature=-1", "api.temperature=0", "port=0"))


def test_bench_ceiling_needs_a_gpu_device():
    with pytest.raises(ConfigError, match="auto_micro_batch_gib=13: measures GPU memory, and this run is on cpu"):
        bench.bench_device(composed("bench", "device=cpu", "auto_micro_batch_gib=13"))
    assert bench.bench_device(composed("bench", "device=cpu")) == torch.device("cpu")


def test_bench_on_auto_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device=auto: this machine has no GPU, and the benchmark times GPUs "
                                          r"\(model_config builds a 28-layer, hidden-4096 model\); pass device=cpu"):
        bench.bench_device(composed("bench"))


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"device='cuda:x': expected auto, cpu, cuda or cuda:N"):
        resolve_device("cuda:x")
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"device=cuda:{count}: " + (
            f"this machine has {count} CUDA device" if count else "no CUDA device on this machine; use cpu or auto")):
        resolve_device(f"cuda:{count}")


@pytest.mark.parametrize("module, override, message", [
    ("ptune.evaluate", "batch_size=0", "error: batch_size=0: expected a whole number of at least 1"),
    ("ptune.chat", "generation.top_p=2", "error: generation.top_p=2: expected a number from 0 to 1"),
    ("ptune.sweep", "device=gpu", "error: device='gpu': expected auto, cpu, cuda or cuda:N"),
    ("ptune.evaluate", "limit=3", "error: data.eval_file is not set; pass data.eval_file=... on the command line"),
    ("ptune.sweep", "data.eval_file=README.md", "error: runs: "),  # a SweepError: no such run folder
])
def test_command_line_refuses_before_loading(module, override, message, tmp_path):
    """The checkpoint named does not exist: the setting is refused before anything tries to load it."""
    missing = tmp_path / "run" / "checkpoint-1"
    target = f"runs=[{missing.parent}]" if module == "ptune.sweep" else f"checkpoint={missing}"
    proc = subprocess.run([sys.executable, "-m", module, target, override], cwd=REPO, capture_output=True, text=True,
                          timeout=120, input="")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("experiment", ["adgen_60steps", "adgen_3000steps"])
def test_the_reference_recipes_cut_prompts_as_the_reference_does(experiment):
    """ChatGLM2-6B's ptuning scripts keep a prompt's first max_source_length tokens (their tokenizer truncates on
    the right); the built-in sample's data settings cut from the left, for chat templates, and must not leak in."""
    data = composed("train", f"+experiment={experiment}").data
    assert (data.max_source_length, data.max_target_length, data.truncate_source_from) == (64, 128, "right")
