"""Tiny real models and a real tokenizer, built in fixtures: no downloads, seconds on two CPU cores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny matrices gain nothing from threads, and idle OpenMP workers spinning against a second process
# (the CLI tests, torchrun) slow such runs down 30x on two cores. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# A suite started as a background job of a shell without job control (`(pytest &)` in a script) inherits
# SIGINT ignored, and so would every command line it starts: the Ctrl-C tests would find their signal
# dropped. The commands themselves keep Ctrl-C ignored where it was, as a shell's `&` asks.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))  # its harness runs command lines for other files too


def pytest_xdist_auto_num_workers(config):
    """What `-n auto` (set in pyproject.toml) means: one worker per core on a CPU-only machine, up to 4.

    On a machine with a GPU the tests run in one process: the memory-probing tests (automatic
    micro-batch, the checkpointing choice) read the card's free memory, which a second worker would change.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    if torch.cuda.is_available():
        return 0
    return max(1, min(4, len(os.sched_getaffinity(0))))

SHARED = REPO.parent / "shared"

# Each file runs whole on one worker (--dist loadfile), handed out in collection order (xdist's own
# reordering by test count is off in pyproject.toml: it put the few-test, minutes-long training files last,
# and one worker ran them alone at the end). The slowest files go first; seconds on 2 cores from
# `pytest --durations=0`, 2026-11-27 (training runs forked from a warm interpreter): about 150, 120, 101, 86,
# 83, 75, 61, 57, 57, 56, 48, 41, 40, 37.
SLOWEST_FILES = ["test_chat.py", "test_recipes.py", "test_web.py", "test_serve.py", "test_train_ranks.py",
                 "test_sweep.py", "test_train.py", "test_hostile_input.py", "test_bench.py",
                 "test_resume_after_kill.py", "test_crash_safe_saves.py", "test_evaluate.py",
                 "test_entry_point_settings.py", "test_train_logs.py"]


def pytest_collection_modifyitems(config, items):
    first = {name: rank for rank, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: a file's tests keep their order

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def sample_rows(n: int | None = None) -> list[dict]:
    from ptune.config import asset_path

    rows = [json.loads(line) for line in Path(asset_path("adgen_sample.jsonl")).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return rows[:n] if n else rows


def _byte_symbols() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (printable Latin-1 bytes stand for themselves)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _byte_level_core(chars: list[str]):
    """Byte-level BPE whose merges build each of `chars` whole, at the character-level tokenizer's ids (every byte
    has an id after them): transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer, a byte-level BPE,
    whatever tokenizer_class says, which rebuilt from the character-level vocabulary dropped every Chinese
    character and space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbol = _byte_symbols()
    spelled = lambda text: "".join(symbol[b] for b in text.encode("utf-8"))  # noqa: E731
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(spelled(c), len(vocab))
    for b in range(256):
        vocab.setdefault(symbol[b], len(vocab))
    merges = []
    for c in chars:
        whole = spelled(c)
        for k in range(2, len(whole) + 1):
            vocab.setdefault(whole[:k], len(vocab))
            merges.append((whole[:k - 1], whole[k - 1]))
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(dict.fromkeys(merges))))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return core


def build_tokenizer(out: Path, byte_level: bool = False):
    """A character-level fast tokenizer over the sample's characters plus ASCII, with a chat template; with
    `byte_level`, a byte-level BPE that encodes those characters to the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for r in sample_rows() for c in r["content"] + r["summary"]} | {chr(i) for i in range(32, 127)})
    chars = [c for c in chars if c not in SPECIALS]
    if byte_level:
        core = _byte_level_core(chars)
    else:
        core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + chars)}, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        core.decoder = decoders.Fuse()  # characters back together, no spaces between them
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def tiny_config(family: str, vocab_size: int):
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    if family == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **common)
    if family == "glm":  # the ChatGLM2-6B shape: multi-query groups, partial interleaved rotary
        return T.GlmConfig(num_key_value_heads=2, head_dim=8, **common)
    if family == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **common)
    if family == "gemma2":
        return T.Gemma2Config(num_key_value_heads=1, head_dim=8, **common)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=2,
                            eos_token_id=3, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ["llama", "glm", "qwen2", "gemma2", "gpt2"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(family)` -> folder with config, safetensors weights and tokenizer (cached per session)."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(family: str = "llama") -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            tok = build_tokenizer(out, byte_level=family == "qwen2")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)))
            model.save_pretrained(out, safe_serialization=True)
            made[family] = out
        return made[family]

    return make


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory) -> Path:
    """64 AdvertiseGen-format rows as JSON lines."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows(64)), encoding="utf-8")
    return path


def train_tiny_run(model_dir: Path, data: Path, out: Path, steps: int = 2) -> Path:
    """Train a tiny prefix through the trainer's command line; returns the last checkpoint."""
    run_train(f"model.path={model_dir}", f"data.train_file={data}", f"output_dir={out}", "prefix.length=4",
              f"trainer.max_steps={steps}", f"trainer.save_steps={steps}", "trainer.log_steps=1",
              "trainer.per_device_batch_size=2", "trainer.gradient_accumulation_steps=1", "trainer.progress_bar=false",
              "trainer.tensorboard=false", "optim.lr=0.05")
    return out / f"checkpoint-{steps}"


# Training through the command line, for tests that check what a whole run does.
def run_train(*overrides: str, check: bool = True, launcher: list[str] | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m ptune.train overrides...`, or `launcher + [ptune.train, ...]` (torchrun) as a subprocess.

    Without a launcher the command runs as a forked child of the reliability suite's warm interpreter: the
    same entry point, argv, exit status and output, without importing torch and transformers again (~8 s a
    run). The recipe and quickstart tests run the trainer as a fresh process."""
    if launcher is None:
        from reliability_harness import cli

        res = cli("ptune.train", *overrides, env=env, timeout=600)
        cmd = ["python", "-m", "ptune.train", *overrides]
        proc = subprocess.CompletedProcess(cmd, -9 if res.rc is None else res.rc, res.stdout, res.stderr)
    else:
        cmd = launcher + ["ptune.train", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def small_run(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model_dir}", f"data.train_file={data}", f"output_dir={out}", "prefix.length=4",
            "trainer.max_steps=6", "trainer.log_steps=1", "trainer.save_steps=3", "trainer.per_device_batch_size=2",
            "trainer.gradient_accumulation_steps=2", "trainer.progress_bar=false", "trainer.tensorboard=false",
            "optim.lr=0.05", *extra]


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_model_dir, sample_file, tmp_path_factory) -> Path:
    """checkpoint-2 of a tiny llama run (prefix length 4), trained once per test session. Read-only: tests
    that change a checkpoint copy it first."""
    return train_tiny_run(tiny_model_dir("llama"), sample_file, tmp_path_factory.mktemp("trained") / "run")


@contextlib.contextmanager
def device_memory_cap(extra_bytes: int):
    """The CUDA allocator of this process refuses to hold more than `extra_bytes` beyond what it holds now: its
    own out-of-memory error where the code would run out on a smaller card (nothing is injected)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    before = torch.cuda.get_per_process_memory_fraction()
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + extra_bytes) / total)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(before)
        torch.cuda.empty_cache()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def two_rank_launcher() -> list[str]:
    """`torchrun --nproc_per_node 2` on a free port: a fixed one can be held by another test's ranks."""
    with free_socket() as sock:
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


class LiveServer:
    """The app under a real uvicorn server in a background thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = free_socket()
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def toy_batch(vocab: int, seed: int = 1) -> dict:
    """Three right-padded rows of different lengths, prompt positions and padding masked out of the labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
