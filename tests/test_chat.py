"""The terminal chat, driven through a pipe and through a pseudo-terminal, and its streaming decoder."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import build_tokenizer, device_memory_cap
from ptune.chat import StreamDecoder, load_chat_model
from ptune.data import decode_reply
from ptune.data import prompt_ids
from ptune.evaluate import predict

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 8
TURN = re.compile(r"\[turn (\d+): history (\d+) turn\(s\), prompt (\d+) tokens\]\nAssistant: (.*?)\n\nUser: ", re.S)


def compose(name: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


def greedy(cm, prompt: list[int]) -> str:
    gen = OmegaConf.create({"max_new_tokens": MAX_NEW, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "compile_step": False,
                            "seed": 0, "extra_eos_token_ids": []})
    return predict(cm.model, cm.tokenizer, [prompt], gen, 1, cm.device, progress=False)[0][0]


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoint) -> Path:
    return trained_checkpoint


def chat_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "ptune.chat", "device=cpu", "generation=greedy",
            f"generation.max_new_tokens={MAX_NEW}", "show_prompt=true", *overrides]


def test_pipe_keeps_history_clear_resets_it_and_eof_quits(checkpoint):
    proc = subprocess.run(chat_cmd(f"checkpoint={checkpoint}"), input="hello\nworld\n\nclear\nhello\n", cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    turns = TURN.findall(proc.stdout)
    assert [(t[0], t[1]) for t in turns] == [("1", "0"), ("2", "1"), ("1", "0")], proc.stdout
    assert "History cleared." in proc.stdout
    cm = load_chat_model(compose("chat", f"checkpoint={checkpoint}", "device=cpu"))
    first = prompt_ids(cm.tokenizer, "hello", [], cm.template)
    a1 = turns[0][3]
    second = prompt_ids(cm.tokenizer, "world", [("hello", a1)], cm.template)
    # The second prompt carries the first turn; after `clear` the prompt is the first one again.
    assert int(turns[0][2]) == len(first) and int(turns[1][2]) == len(second) > len(first) + len(a1)
    assert int(turns[2][2]) == len(first)
    assert a1 == greedy(cm, first) == turns[2][3]
    assert turns[1][3] == greedy(cm, second)


class Terminal:
    """The controlling side of a pseudo-terminal: what the program wrote, less colours and carriage returns."""

    def __init__(self, fd: int):
        self.fd, self.raw, self.seen = fd, b"", 0

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", self.raw.decode("utf-8", errors="replace")).replace("\r", "")

    def read_until(self, marker: str, timeout: float = 90) -> str:
        """Text written since the last call, up to and including the next `marker`."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            at = text.find(marker, self.seen)
            if at >= 0:
                new, self.seen = text[self.seen:at + len(marker)], at + len(marker)
                return new
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in the terminal output:\n{text}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the program closed its side
                    chunk = b""
                assert chunk, f"the terminal closed before {marker!r}:\n{text}"
                self.raw += chunk

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


@contextlib.contextmanager
def chat_in_terminal(*settings: str):
    """(process, Terminal) of `python -m ptune.chat` run on a pseudo-terminal; killed if still running after."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(chat_cmd(*settings), stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                            env={**os.environ, "TERM": "dumb"}, close_fds=True)
    os.close(slave)
    try:
        yield proc, Terminal(master)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@pytest.mark.slow
def test_pseudo_terminal_base_model_stop_quits(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    with chat_in_terminal("checkpoint=null", f"model.path={model_dir}") as (proc, term):
        assert "base model, no prefix" in term.read_until("User: ")
        term.type("hello")
        turn1 = term.read_until("User: ")
        term.type("world")
        turn2 = term.read_until("User: ")
        term.type("clear")
        assert "History cleared." in term.read_until("User: ")
        term.type("stop")
        assert proc.wait(timeout=60) == 0
    assert "[turn 1: history 0 turn(s)" in turn1 and "[turn 2: history 1 turn(s)" in turn2
    answer = re.search(r"Assistant: (.*?)\n\nUser: ", turn1, re.S).group(1)
    cm = load_chat_model(compose("chat", "checkpoint=null", f"model.path={model_dir}", "device=cpu"))
    assert cm.template == "chat_template"
    assert answer == greedy(cm, prompt_ids(cm.tokenizer, "hello", [], cm.template))


def byte_level_tokenizer():
    """A GPT-2-style byte-level tokenizer with no merges: one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_stream_decoder_never_splits_a_character():
    tok = byte_level_tokenizer()
    text = "连衣裙 is 红色!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # 3 tokens per Chinese character
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[:3] == ["", "", "连"]  # held back until the character is complete
    # A reply cut by its token limit part-way through a character leaves that character out, streamed or whole.
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids[:5]] + [dec.flush()]
    assert "".join(pieces) == dec.text() == "连" and decode_reply(tok, ids[:5]) == "连"


def test_stream_decoder_holds_back_what_may_begin_a_stop_string(tmp_path):
    tok = build_tokenizer(tmp_path)
    ids = tok.encode("abcabd xy", add_special_tokens=False)
    dec = StreamDecoder(tok, stop=("abd", "xz"))
    pieces = [dec.push(i) for i in ids[:4]]
    assert pieces == ["", "", "abc", ""]  # "a", "ab" may begin "abd"; "abc" cannot; the next "a" may again
    assert dec.push(ids[4]) == "" and dec.push(ids[5]) == "" and dec.stopped  # "abd" ended the reply
    assert dec.push(ids[6]) == "" and dec.flush() == "" and dec.text() == "abc"
    # A reply that ends in what might have begun a stop string hands that out at the end.
    dec = StreamDecoder(tok, stop=("xz",))
    pieces = [dec.push(i) for i in tok.encode("ab x", add_special_tokens=False)] + [dec.flush()]
    assert pieces == ["a", "b", " ", "", "x"] and not dec.stopped


def test_streamed_text_equals_the_reply_under_a_tokenizer_that_cleans_up_spaces(tmp_path):
    """Decode cleanup turns 'a ,' into 'a,': text already streamed ('a ') would be rewritten, and the stream
    stopped for good. Replies are decoded without the cleanup, streamed or not."""
    tok = build_tokenizer(tmp_path)
    tok.clean_up_tokenization_spaces = True
    ids = tok.encode("a , b . c", add_special_tokens=False)
    assert tok.decode(ids) == "a, b. c"  # the cleanup is on
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == dec.text() == "a , b . c"


def test_pipe_over_long_or_undecodable_line_is_refused_and_the_chat_goes_on(tiny_model_dir):
    """GPT-2's 512 learned positions hold prompt and reply: a line that leaves no room for a reply of
    max_new_tokens gets a one-line refusal, as does a line that is not UTF-8; the next line is answered."""
    model_dir = tiny_model_dir("gpt2")
    lines = b"x" * 600 + b"\nab\xff\xfecd\nhello\nstop\n"
    proc = subprocess.run(chat_cmd("checkpoint=null", f"model.path={model_dir}", "model.template=plain"), input=lines,
                          cwd=REPO, capture_output=True, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert (f"[this message is 600 tokens; the prompt may have at most {512 - MAX_NEW}: the model's 512 positions "
            f"(n_positions) less generation.max_new_tokens={MAX_NEW} for the reply; "
            "the history is kept]") in out
    assert "[this line is not valid UTF-8 and is skipped; the chat goes on]" in out
    turns = TURN.findall(out)
    assert len(turns) == 1 and turns[0][:2] == ("1", "0"), out  # hello, answered with no history
    cm = load_chat_model(compose("chat", "checkpoint=null", f"model.path={model_dir}", "model.template=plain",
                                 "device=cpu"))
    assert turns[0][3] == greedy(cm, prompt_ids(cm.tokenizer, "hello", [], "plain"))


def test_a_reply_length_that_fills_the_models_positions_is_refused(tiny_model_dir):
    proc = subprocess.run(chat_cmd("checkpoint=null", f"model.path={tiny_model_dir('gpt2')}",
                                   "generation.max_new_tokens=512"), input="hello\n", cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("error: generation.max_new_tokens=512: expected fewer than the model's 512 positions "
            "(n_positions)") in proc.stderr


def test_an_extra_stop_id_past_the_vocabulary_is_one_clear_line(tiny_model_dir):
    proc = subprocess.run(chat_cmd("checkpoint=null", f"model.path={tiny_model_dir('gpt2')}",
                                   "generation.extra_eos_token_ids=[3,100000]"), input="hello\n", cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: generation.extra_eos_token_ids=[3, 100000]: 100000 is not a token id of this model" in proc.stderr


def test_a_message_too_long_to_answer_keeps_the_history(checkpoint):
    """Refusing one over-long message must not cost the conversation so far: history is dropped only to make
    room for a reply that is then given."""
    proc = subprocess.run(chat_cmd(f"checkpoint={checkpoint}"), input="hello\n" + "x" * 2100 + "\nworld\n", cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the history is kept]" in proc.stdout and "dropped" not in proc.stdout, proc.stdout
    turns = TURN.findall(proc.stdout)
    assert [(t[0], t[1]) for t in turns] == [("1", "0"), ("2", "1")], proc.stdout  # world still follows hello


def test_a_turn_out_of_memory_is_one_line_and_the_chat_goes_on_without_it(checkpoint, monkeypatch):
    """What the CUDA allocator raises, injected into the second turn's generation: the conversation so far is kept
    and the next message is answered with it."""
    import io

    import torch

    import ptune.chat as chat

    cfg = compose("chat", f"checkpoint={checkpoint}", "device=cpu", "generation=greedy",
                  f"generation.max_new_tokens={MAX_NEW}", "show_prompt=true")
    cm = load_chat_model(cfg)
    real, calls = chat.generate, []

    def generate(*args, **kwargs):
        calls.append("_ptune_kept_decoders" in cm.model.base.__dict__)  # the decoders kept since the last turn
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.\nOf the allocated ...")
        return real(*args, **kwargs)

    monkeypatch.setattr(chat, "generate", generate)
    stdout = io.StringIO()
    assert chat.chat_loop(cm, cfg, io.StringIO("hello\nlong one\nworld\n"), stdout) == 0
    text = stdout.getvalue()
    assert ("\n[out of memory (CUDA out of memory. Tried to allocate 3.00 GiB.); this turn is not kept. 'clear' the "
            "history, or lower max_prompt_tokens or generation.max_new_tokens]\n") in text, text
    turns = TURN.findall(text)
    # "long one" starts with hello's turn as history; so does world, as if it had not been sent
    assert [(t[0], t[1]) for t in turns] == [("1", "0"), ("2", "1"), ("2", "1")], text
    # the failed turn's memory is let go: the decoder kept from the first turn is dropped, not reused
    assert calls == [False, True, False]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the CUDA allocator's own out-of-memory error")
def test_a_turn_past_the_allocators_limit_is_one_line_and_the_next_turn_is_answered(checkpoint, monkeypatch):
    """Not injected: while the second turn generates, the allocator may hold nothing more than it does."""
    import io

    import ptune.chat as chat

    cfg = compose("chat", f"checkpoint={checkpoint}", "device=cuda", "generation=greedy",
                  "generation.max_new_tokens=64", "show_prompt=true")
    cm = load_chat_model(cfg)
    real, calls = chat.generate, []

    def generate(*args, **kwargs):
        calls.append(None)
        if len(calls) != 2:
            return real(*args, **kwargs)
        with device_memory_cap(0):
            return real(*args, **kwargs)

    monkeypatch.setattr(chat, "generate", generate)
    stdout = io.StringIO()
    assert chat.chat_loop(cm, cfg, io.StringIO("hello\n" + "long one " * 20 + "\nworld\n"), stdout) == 0
    text = stdout.getvalue()
    assert "\n[out of memory (CUDA out of memory." in text and "this turn is not kept" in text, text
    assert [(t[0], t[1]) for t in TURN.findall(text)] == [("1", "0"), ("2", "1"), ("2", "1")], text
    assert len(calls) == 3


@pytest.mark.slow
def test_ctrl_c_mid_reply_stops_that_reply_and_the_chat_goes_on_without_it(checkpoint):
    """SIGINT (what a terminal sends for Ctrl-C) while a long reply streams: the reply stops, the turn is not
    kept, and the next message is answered as a first turn."""
    with chat_in_terminal(f"checkpoint={checkpoint}", "generation.max_new_tokens=1900") as (proc, term):
        term.read_until("User: ")
        term.type("hello")
        term.read_until("Assistant: ")
        time.sleep(0.5)  # into the reply: 1900 tokens take seconds
        proc.send_signal(signal.SIGINT)
        assert "[interrupted; this turn is not kept]" in term.read_until("User: ")
        term.type("hello")
        assert "[turn 1: history 0 turn(s)" in term.read_until("User: ")
        term.type("stop")
        assert proc.wait(timeout=60) == 0
    assert "Traceback" not in term.text()


def test_ctrl_c_while_the_model_loads_is_one_line_and_status_130(checkpoint):
    for _ in range(3):  # the tiny model loads in a fraction of a second: try again if the signal came too late
        proc = subprocess.Popen(chat_cmd(f"checkpoint={checkpoint}"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=REPO, text=True)
        assert "loading" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("stop\n", timeout=60)
        if "Chatting with" not in out:
            break
    assert "Chatting with" not in out, "the model loaded before the signal three times"
    assert proc.returncode == 130 and err.strip() == "chat interrupted while loading the model", err[-3000:]


def test_a_closed_output_pipe_ends_the_chat_quietly_with_status_141(checkpoint):
    """`python -m ptune.chat ... | head`: once the reader is gone, no BrokenPipeError traceback."""
    proc = subprocess.Popen(chat_cmd(f"checkpoint={checkpoint}"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, text=True)
    assert proc.stdout.readline().startswith("Chatting with")
    proc.stdout.close()
    _, err = proc.communicate("hello\nworld\n", timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err and "Error" not in err, err[-3000:]


def test_an_output_encoding_without_the_replys_characters_shows_them_as_question_marks(checkpoint):
    """A latin-1 terminal (or a Windows code page) cannot show the Chinese of a reply: '?' instead of a crash."""
    proc = subprocess.run(chat_cmd(f"checkpoint={checkpoint}"), input=b"hello\nworld\n", cwd=REPO,
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "latin-1"})
    out, err = proc.stdout.decode("latin-1"), proc.stderr.decode("latin-1")
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    turns = TURN.findall(out)
    assert len(turns) == 2 and "?" in turns[0][3], out


@pytest.mark.parametrize("setting, message", [
    ("show_prompt=maybe", "error: show_prompt='maybe': expected true or false"),
    ("user_name=null", "error: user_name=None: expected a name to label the turns with"),
    ("checkpoint={file}", "error: checkpoint={file}: a file, not a folder"),
])
def test_a_wrong_setting_is_one_line_naming_it(checkpoint, setting, message):
    file = checkpoint / "prefix_config.json"
    proc = subprocess.run(chat_cmd(f"checkpoint={checkpoint}", setting.format(file=file)), input="hello\n", cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message.format(file=file)), proc.stderr


def test_sigterm_mid_reply_ends_the_chat_with_one_line_and_status_143(checkpoint):
    """Ctrl-C mid-reply only stops that reply; SIGTERM (a `kill`, a closing session) ends the program."""
    proc = subprocess.Popen(chat_cmd(f"checkpoint={checkpoint}", "generation.max_new_tokens=1900"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        seen = b""
        while b"Assistant: " not in seen:  # the reply has begun: 1900 tokens take seconds
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"the chat ended before replying: {proc.stderr.read().decode()[-3000:]}"
            seen += chunk
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err.decode()[-3000:]
    assert err.decode().splitlines()[-1] == "chat interrupted (SIGTERM)" and b"Traceback" not in err
    assert b"this turn is not kept" not in seen + out and b"User: " not in out  # not another turn


def test_fit_history_drops_the_fewest_oldest_turns_that_make_the_prompt_fit(tmp_path):
    """fit_history finds by binary search what dropping the oldest turn one at a time finds, for every limit
    from one that fits nothing to one that fits everything."""
    from ptune.chat import build_prompt, fit_history

    tok = build_tokenizer(tmp_path)
    history = [(f"question {i} " * (i % 3 + 1), f"answer {i} " * (i % 4 + 1)) for i in range(9)]
    full = len(build_prompt(tok, "plain", "last one", history))
    alone = len(build_prompt(tok, "plain", "last one", []))
    for limit in range(alone - 1, full + 1):
        kept = history
        while kept and len(build_prompt(tok, "plain", "last one", kept)) > limit:
            kept = kept[1:]
        ids, got = fit_history(tok, "plain", "last one", history, limit)
        assert got == kept and ids == build_prompt(tok, "plain", "last one", kept), limit
    assert fit_history(tok, "plain", "last one", history, None)[1] == history


def test_a_bare_chatglm_base_chats_in_its_round_format(tmp_path, tiny_model_dir):
    """checkpoint=null model.path=<ChatGLM2/3 folder>: the [Round n] 问/答 format its own chat and api.py build,
    not the tokenizer's chat template or plain text; a template given still wins, and other bases are unchanged."""
    import shutil

    chatglm = tmp_path / "chatglm"
    shutil.copytree(REPO / "tests" / "golden" / "chatglm" / "tiny_chatglm2", chatglm)
    build_tokenizer(chatglm)  # it has a chat template of its own, which a ChatGLM base does not use
    cm = load_chat_model(compose("chat", "checkpoint=null", f"model.path={chatglm}", "device=cpu"))
    assert cm.template == "chatglm2"
    text = cm.tokenizer.decode(prompt_ids(cm.tokenizer, "你好", [("问题", "回答")], cm.template))
    assert text.startswith("[Round 1]") and "[Round 2]" in text  # (the fixture's tokenizer lacks 问, 答 and ：)
    given = load_chat_model(compose("chat", "checkpoint=null", f"model.path={chatglm}", "model.template=plain",
                                    "device=cpu"))
    assert given.template == "plain"
    llama = load_chat_model(compose("chat", "checkpoint=null", f"model.path={tiny_model_dir('llama')}", "device=cpu"))
    assert llama.template == "chat_template"
