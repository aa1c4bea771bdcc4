"""Talk to a tuned model in the terminal: `python -m ptune.chat checkpoint=outputs/<run>/checkpoint-N`.

A run folder (`checkpoint=outputs/<run>`) talks to its newest complete checkpoint;
`checkpoint=null model.path=<dir>` talks to the base model alone. Lines are read from standard input
one at a time, so the chat can also be driven through a pipe; `clear` forgets the history, `stop` (or
end of input) quits. Replies stream as they are generated.

The pieces shared with `ptune.serve` live here too: loading the model with its prompt template, building
a prompt (with an optional system message), and turning a stream of token ids into a stream of text.
"""

from __future__ import annotations

# Run as a command, the config is composed (and --help or a setting Hydra refuses answered) before the
# imports below take their seconds; ptune.command then imports this module again and calls main(cfg).
if __name__ == "__main__":
    from ptune.command import run_command

    run_command("chat")

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptune.settings import resolve_device
from ptune import settings
from ptune.data import check_template_fits, decode_reply, encodable, prompt_ids
from ptune.generate import generate, release_decoding_memory, stop_token_ids
from ptune.errors import ConfigError, exit_on_user_error, first_line, stopped, terminating
from ptune.logs import setup_logging
from ptune.models import inference_model_settings, is_chatglm, load_for_inference, position_limit, resolve_checkpoint

log = logging.getLogger("ptune.chat")

COMMAND_CLEAR = "clear"
COMMAND_STOP = "stop"

@dataclass
class ChatModel:
    """A loaded model with everything needed to prompt it and to stop its replies."""

    model: torch.nn.Module
    tokenizer: object
    template: str
    device: torch.device
    eos_token_ids: list[int]
    checkpoint: str | None
    base_path: str
    step: int | None = None
    prefix_config: dict | None = field(default=None, repr=False)
    max_positions: int | None = None  # prompt + reply tokens the model can take (None: no limit known)
    positions_key: str | None = None  # the config key that said so

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def describe(self) -> str:
        what = self.checkpoint if self.checkpoint else f"{self.base_path} (base model, no prefix)"
        return f"{what}, template {self.template}, on {self.device.type}"


def load_chat_model(cfg: DictConfig) -> ChatModel:
    """The model named by `cfg.checkpoint` / `cfg.model`, as `ptune.evaluate` loads it."""
    device = resolve_device(cfg.device)
    checkpoint = resolve_checkpoint(str(Path(str(cfg.checkpoint)).expanduser())) if cfg.checkpoint else None
    model, tokenizer, prefix_config = load_for_inference(checkpoint, cfg.model, device)
    settings = inference_model_settings(prefix_config, OmegaConf.to_container(cfg.model))
    template = settings.get("template")
    if not template:
        # A bare base with no template given: ChatGLM2/3's round format (what their own chat and api.py build, and
        # conf/model/chatglm*_6b.yaml give), else its own chat template when it has one.
        template = ("chatglm2" if is_chatglm(Path(str(settings["path"])))
                    else "chat_template" if getattr(tokenizer, "chat_template", None) else "plain")
    check_template_fits(tokenizer, template)  # at start-up, not at the first message or request
    eos = stop_token_ids(model, tokenizer, cfg.generation.get("extra_eos_token_ids"))
    limit, key = position_limit(model) or (None, None)
    return ChatModel(model=model, tokenizer=tokenizer, template=template, device=device, eos_token_ids=eos,
                     checkpoint=checkpoint, base_path=str(settings["path"]),
                     step=(prefix_config or {}).get("step"), prefix_config=prefix_config,
                     max_positions=limit, positions_key=key)


def build_prompt(tokenizer, template: str, query: str, history, system: str | None = None) -> list[int]:
    """Prompt ids for `query` after `history` ([question, answer] pairs), as training and evaluation build
    them (`ptune.data.prompt_ids`, which also places the system message); history may come as lists."""
    history = [(str(q), str(a)) for q, a in (history or [])]
    return prompt_ids(tokenizer, query, history, template, system)


def fit_history(tokenizer, template: str, query: str, history, max_prompt_tokens: int | None,
                system: str | None = None) -> tuple[list[int], list]:
    """(prompt ids, kept history): the fewest oldest turns are dropped for the prompt to fit
    `max_prompt_tokens`; all of them where even that is not enough (the ids are then still too long)."""
    history = list(history or [])
    ids = build_prompt(tokenizer, template, query, history, system)
    if not max_prompt_tokens or len(ids) <= max_prompt_tokens or not history:
        return ids, history
    # A prompt shortens as turns leave, so a binary search: a few tokenizations for a long conversation.
    low, high = 1, len(history)  # dropping `high` fits, or it is every turn
    while low < high:
        middle = (low + high) // 2
        if len(build_prompt(tokenizer, template, query, history[middle:], system)) <= max_prompt_tokens:
            high = middle
        else:
            low = middle + 1
    return build_prompt(tokenizer, template, query, history[high:], system), history[high:]


class StreamDecoder:
    """Text of a reply as its tokens arrive: re-decodes the reply so far and hands out the new suffix.

    A character that the tokens so far end part-way through is held back until the next token completes it
    (:func:`decode_reply`). With stop strings, the reply ends before the first one
    that appears (`stopped` turns true), and text that may be the start of one is held back until it is
    known not to be: a stop string is never handed out, not even in part.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False

    def text(self) -> str:
        """The reply so far, cut before a stop string once one has appeared."""
        return self._cut(decode_reply(self.tokenizer, self.tokens))

    def _cut(self, text: str) -> str:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[:min(cuts)] if cuts else text

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` could begin a stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        whole = decode_reply(self.tokenizer, self.tokens)
        text = self._cut(whole)
        self.stopped = len(text) < len(whole)
        if not self.stopped:
            text = text[:len(text) - self._held_back(text)]
        if not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    def flush(self) -> str:
        """What is left to show once the reply is complete (an incomplete character, text held back)."""
        text = self.text()
        if not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new


def prompt_limit(cm: ChatModel, max_prompt_tokens: int, max_new_tokens: int) -> tuple[int, str]:
    """(most prompt tokens, what sets that limit): max_prompt_tokens, or less where the model's positions
    must also hold a reply of max_new_tokens."""
    if cm.max_positions is not None and cm.max_positions - max_new_tokens < max_prompt_tokens:
        return (cm.max_positions - max_new_tokens,
                f"the model's {cm.max_positions} positions ({cm.positions_key}) less generation.max_new_tokens="
                f"{max_new_tokens} for the reply")
    return max_prompt_tokens, f"max_prompt_tokens={max_prompt_tokens}"


def check_room_for_prompt(cm: ChatModel, max_new_tokens: int) -> None:
    """Refuse a reply length that leaves no position for a prompt (every message would be refused)."""
    if cm.max_positions is not None and max_new_tokens >= cm.max_positions:
        raise ConfigError(f"generation.max_new_tokens={max_new_tokens}: expected fewer than the model's "
                          f"{cm.max_positions} positions ({cm.positions_key}), which hold the prompt and the reply")


def generation_kwargs(gen: DictConfig) -> dict:
    return {"do_sample": bool(gen.do_sample), "temperature": float(gen.temperature), "top_p": float(gen.top_p),
            "compile_step": bool(gen.compile_step)}


def reply(cm: ChatModel, prompt: list[int], gen: DictConfig, on_text=None, turn: int = 0) -> str:
    """Generate one reply to `prompt`, calling `on_text(new_text)` as it grows; the full reply is returned. A
    sampled reply draws from the stream of (generation.seed, turn): a conversation typed again replays."""
    batch = torch.tensor([prompt], dtype=torch.long, device=cm.device)
    decoder = StreamDecoder(cm.tokenizer)
    eos = set(cm.eos_token_ids)
    finished = False

    def on_token(col):
        nonlocal finished
        token = int(col[0])
        if finished or token in eos:
            finished = True
            return
        new = decoder.push(token)
        if new and on_text is not None:
            on_text(new)

    generate(cm.model, batch, torch.ones_like(batch), max_new_tokens=int(gen.max_new_tokens),
             eos_token_ids=cm.eos_token_ids, pad_token_id=cm.pad_token_id,
             sample_keys=[(int(gen.seed), turn)], on_token=on_token, keep_decoder=True, **generation_kwargs(gen))
    rest = decoder.flush()
    if rest and on_text is not None:
        on_text(rest)
    return decoder.text()


def take_turn(cm: ChatModel, cfg: DictConfig, query: str, history: list, out, turn: int = 0) -> list:
    """Answer `query` (streamed through `out`); returns the history that follows this turn.

    The history changes only with a finished reply: a message refused as too long, or a reply cut short
    by Ctrl-C, leaves it as it was, older turns included (they are dropped only to make room for a reply).
    """
    gen = cfg.generation
    limit, why = prompt_limit(cm, int(cfg.max_prompt_tokens), int(gen.max_new_tokens))
    prompt, kept = fit_history(cm.tokenizer, cm.template, query, history, limit)
    if len(prompt) > limit:
        out(f"[this message is {len(prompt)} tokens; the prompt may have at most {limit}: {why}; "
            "the history is kept]\n")
        return history
    if len(kept) < len(history):
        out(f"[dropped the {len(history) - len(kept)} oldest turn(s) to fit {why}]\n")
    if cfg.show_prompt:
        out(f"[turn {len(kept) + 1}: history {len(kept)} turn(s), prompt {len(prompt)} tokens]\n")
    out(f"{cfg.assistant_name}: ")
    answer = reply(cm, prompt, gen, on_text=out, turn=turn)
    out("\n")
    return kept + [(query, answer)]


def chat_loop(cm: ChatModel, cfg: DictConfig, stdin=None, stdout=None) -> int:
    """The read-reply loop; returns the exit code."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    if hasattr(stdin, "reconfigure"):
        # Bytes that are not UTF-8 then arrive as lone surrogates, refused line by line below, instead of
        # a UnicodeDecodeError that ends the chat.
        stdin.reconfigure(errors="surrogateescape")
    if hasattr(stdout, "reconfigure"):
        # A terminal or file whose encoding lacks a reply's characters (latin-1, a Windows code page) shows
        # them as "?" instead of a UnicodeEncodeError that ends the chat.
        stdout.reconfigure(errors="replace")
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and arrow-key history for input())
        except ImportError:
            pass
    history: list[tuple[str, str]] = []
    turns = 0  # messages answered or tried: each samples from its own stream

    def out(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    out(f"Chatting with {cm.describe()}.\nType a message; '{COMMAND_CLEAR}' forgets the history, "
        f"'{COMMAND_STOP}' quits.\n")
    while True:
        prompt_label = f"\n{cfg.user_name}: "
        try:
            if interactive and stdin is sys.stdin and stdout is sys.stdout:
                line = input(prompt_label)
            else:
                out(prompt_label)
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            out("\n")
            return 0
        except KeyboardInterrupt:
            if terminating():
                raise
            out("\n")
            return 0
        query = line.rstrip("\r\n")
        command = query.strip().lower()
        if not query.strip():
            continue
        if command == COMMAND_STOP:
            return 0
        if command == COMMAND_CLEAR:
            history = []
            out("History cleared.\n")
            continue
        if not encodable(query):
            out("[this line is not valid UTF-8 and is skipped; the chat goes on]\n")
            continue
        out_of_memory = None
        try:
            turns += 1
            history = take_turn(cm, cfg, query, history, out, turns)
        except KeyboardInterrupt:
            if terminating():
                raise
            out("\n[interrupted; this turn is not kept]\n")
        except torch.OutOfMemoryError as e:  # one long turn need not end the conversation
            out_of_memory = first_line(e)
        if out_of_memory is not None:  # out of the handler, whose traceback holds the failed turn's tensors
            release_decoding_memory(cm.model)
            out(f"\n[out of memory ({out_of_memory}); this turn is not kept. '{COMMAND_CLEAR}' the history, or lower "
                "max_prompt_tokens or generation.max_new_tokens]\n")


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings.chat(cfg)  # python -m ptune.chat checked them before this module's imports; other callers did not
    setup_logging()
    try:
        log.info("loading %s", cfg.checkpoint or cfg.model.path)
        cm = load_chat_model(cfg)
    except KeyboardInterrupt:
        # A 6B model loads for tens of seconds: changing one's mind then is no crash to show a traceback for.
        stopped("chat interrupted while loading the model")
    check_room_for_prompt(cm, int(cfg.generation.max_new_tokens))
    log.debug("config: %s", OmegaConf.to_yaml(cfg))
    try:
        code = chat_loop(cm, cfg)
    except BrokenPipeError:
        # The reader of standard output went away (`| head`). Standard output goes to /dev/null so that
        # the flush at exit cannot fail again; the status is the one a shell gives a command SIGPIPE ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)

