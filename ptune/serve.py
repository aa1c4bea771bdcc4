"""Serve a tuned model over HTTP: `python -m ptune.serve checkpoint=outputs/<run>/checkpoint-N [port=8000]`
(or `checkpoint=outputs/<run>`: that run's newest complete checkpoint).

Endpoints (one FastAPI app, bound to 127.0.0.1 unless `host` says otherwise):

* `POST /` — ChatGLM2-6B's api.py shape: `{"prompt", "history", "max_length", "top_p", "temperature"}`
  in, `{"response", "history", "status", "time"}` out. `max_length` is a total budget (prompt + reply)
  as there. Its defaults are api.py's (top_p 0.7, temperature 0.95: sampled); temperature 0 is greedy.
* `POST /v1/chat/completions` — OpenAI-compatible, `stream: true` answers with server-sent events.
  Without a temperature (or with one <= 0) the reply is greedy.
* `GET /v1/models` (and `GET /v1/models/{id}`), `GET /health`, and a chat page at `GET /` (also `/chat`).

A prompt too long (history included) is refused with 400 `context_length_exceeded`; its error object also holds
`prompt_tokens`, `prompt_limit`, `system_too_long` and `turns_to_leave_out` (the fewest oldest turns whose leaving
out makes it fit, null where none would), which the chat page acts on.

One worker thread owns the model. Requests wait in a queue; the worker takes every request that arrived
within `batch_wait_ms` (up to `max_batch_size`) and generates them together, left-padded, with
`ptune.generate.generate`, each with its own sampling settings and random stream; streamed requests share those
batches and get their text as it comes.
"""

from __future__ import annotations

# Run as a command, the config is composed (and --help or a setting Hydra refuses answered) before the
# imports below take their seconds; ptune.command then imports this module again and calls main(cfg).
if __name__ == "__main__":
    from ptune.command import run_command

    run_command("serve")

import asyncio
import concurrent.futures
import datetime
import errno
import hmac
import ipaddress
import itertools
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional dependency
    raise ImportError(f"ptune.serve needs fastapi and uvicorn: pip install 'ptune[serve]' ({e})") from None
from omegaconf import DictConfig, OmegaConf
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator)
from pydantic_core import PydanticCustomError

from ptune.chat import ChatModel, StreamDecoder, build_prompt, fit_history, load_chat_model
from ptune import settings
from ptune.settings import API_KEY_ENV, api_key_of
from ptune.data import decode_reply, encodable, left_pad
from ptune.generate import generate, release_decoding_memory
from ptune.errors import ConfigError, DataError, exit_on_user_error, first_line
from ptune.logs import setup_logging

log = logging.getLogger("ptune.serve")

MAX_STOP_STRINGS = 4  # as OpenAI's API
SYSTEM_ROLES = ("system", "developer")
PAGE_PATHS = ("/", "/chat", "/favicon.ico")  # with /web/<file>: what GET and HEAD may ask for without the API key
WEB_FILES = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}


# ---------------------------------------------------------------------------------------------- the worker


class _AllFinished(Exception):
    """Raised from the token callback to end a batch whose rows are all finished or abandoned."""


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Job:
    prompt: list[int]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the reply ends before the first of these that appears in it
    on_text: Callable[[str], None] | None = None  # streaming: called from the worker thread with new text
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    streamed: bool = False  # some text went out already: the job cannot be generated again from the start
    # Seeds the job's own random stream (ptune.generate.row_draws): its seed, or one the engine gives it.
    sample_key: tuple[int, ...] = ()

    def __post_init__(self):
        if self.seed is not None:
            self.sample_key = (self.seed,)


class QueueFull(RuntimeError):
    pass


class ShuttingDown(RuntimeError):
    """The server is stopping: a job it had not finished ends unfinished, and no new one is taken."""


class CutShort(RuntimeError):
    """A streamed reply that its batch's failure ended part-way; alone it may well fit."""


SHUTTING_DOWN = "the server is shutting down; send the request again once it is back"


class Engine:
    """Owns the model; a single thread runs the queued jobs in batches."""

    def __init__(self, cm: ChatModel, max_batch_size: int = 8, batch_wait_ms: float = 5.0, max_queue: int = 256,
                 seed: int = 42):
        self.cm = cm
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait = max(0.0, float(batch_wait_ms)) / 1000.0
        self.max_queue = int(max_queue)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        # Jobs the worker took from the queue to batch, not yet running: they still wait, so they count.
        self.waiting: deque[Job] = deque()
        # A request without a seed of its own samples from the stream of (seed, its number): each its own, and
        # a server started again with the same seed answers the same requests in the same order alike.
        self.seed, self.numbers = int(seed), itertools.count()  # next() on it is one step under the GIL
        self.batches = 0           # counters for /health and the tests
        self.largest_batch = 0
        self.served = 0
        self.cancelled = 0  # jobs dropped or ended early because their client went away or the server stopped
        # Set once the server begins to stop (shut_down): generation in flight ends at its next token.
        self.closing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ptune-serve-worker", daemon=True)
        self._thread.start()

    # -- called from request handlers

    def submit(self, job: Job) -> Job:
        if self.closing:
            raise ShuttingDown(SHUTTING_DOWN)
        waiting = self.pending()
        if waiting >= self.max_queue:
            raise QueueFull(f"{waiting} requests are waiting (max_queue={self.max_queue}); retry later")
        if not job.sample_key:
            job.sample_key = (self.seed, next(self.numbers))
        self.queue.put(job)
        return job

    def pending(self) -> int:
        """Requests waiting for a batch whose clients still wait: one that hung up keeps no place in max_queue.
        Those are dropped from the queue here too, so that clients hanging up during a long batch cannot grow it
        without bound."""
        with self.queue.mutex:
            gone = [j for j in self.queue.queue if j is not None and j.cancelled]
            for j in gone:
                self.queue.queue.remove(j)
            queued = sum(1 for j in self.queue.queue if j is not None)
        for j in gone:
            if j.future.cancel():
                self.cancelled += 1
        # tuple() copies the deque in one step under the GIL, while the worker may be changing it
        return queued + sum(1 for j in tuple(self.waiting) if not j.cancelled)

    def shut_down(self) -> None:
        """Ends every job, generating or waiting, with ShuttingDown (a job generating ends at its next token), and
        refuses new ones. For the moment the server begins to stop: it waits for every response in progress to
        end, and a long reply would otherwise be generated whole first, minutes past the seconds a service
        manager allows before it kills the process."""
        self.closing = True

    def close(self) -> None:
        self._stop.set()
        self.queue.put(None)
        self._thread.join(timeout=30)

    # -- the worker thread

    def _loop(self) -> None:
        waiting = self.waiting
        while not self._stop.is_set():
            if not waiting:
                job = self.queue.get()
                if job is None:
                    break
                waiting.append(job)
            # Let the requests that arrive within batch_wait join this batch.
            deadline = time.monotonic() + self.batch_wait
            while len(waiting) < self.max_batch_size:
                timeout = deadline - time.monotonic()
                try:
                    job = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._stop.set()
                    break
                waiting.append(job)
            if self._stop.is_set():
                break
            if self.closing:
                for j in waiting:
                    self._end_unfinished(j)
                waiting.clear()
                continue
            batch, rest = [], deque()
            for j in waiting:
                if len(batch) < self.max_batch_size and self._fits(batch, j):
                    # Once running, a future can no longer be cancelled; a cancelled one is dropped here.
                    if not j.cancelled and j.future.set_running_or_notify_cancel():
                        batch.append(j)
                    elif not j.future.done():
                        j.future.cancel()
                        self.cancelled += 1
                else:
                    rest.append(j)
            waiting = self.waiting = rest
            if batch:
                self._run(batch)
        for j in waiting:
            j.future.cancel()

    def _end_unfinished(self, job: Job) -> None:
        if not job.future.done():
            job.future.set_exception(ShuttingDown(SHUTTING_DOWN))
            self.cancelled += 1

    def _fits(self, batch: list[Job], job: Job) -> bool:
        """Whether `job` may join `batch` within the model's positions. Every row takes a position per step
        until the longest reply ends, so the longest prompt and the longest reply must fit together; a job
        that would not waits for a later batch (requests were checked to fit alone)."""
        limit = self.cm.max_positions
        if limit is None or not batch:
            return True
        rows = batch + [job]
        return max(len(j.prompt) for j in rows) + max(j.max_new_tokens for j in rows) <= limit

    def _run(self, batch: list[Job]) -> None:
        cm = self.cm
        failure = None
        try:
            try:
                self._generate(batch)
            except Exception as e:  # a failed batch fails its requests, not the server
                failure = e
                if len(batch) == 1 and not isinstance(e, torch.OutOfMemoryError):  # the client is told the rest
                    log.exception("generation failed")
            if failure is None:
                return
            # Out of the handler, and without its traceback, the failed generation's frames (its cache and graph)
            # are let go: the retries below may need that memory.
            failure = failure.with_traceback(None)
            out_of_memory_now = isinstance(failure, torch.OutOfMemoryError)
            if out_of_memory_now:
                release_decoding_memory(cm.model)
            if len(batch) == 1 and out_of_memory_now:
                log.error(out_of_memory(batch[0], failure))
            elif len(batch) > 1:
                # One request's failure should not fail the others: each one not yet streamed runs alone.
                log.warning("generation failed for a batch of %d (%s: %s); generating its requests one at a time",
                            len(batch), type(failure).__name__, first_line(failure))
            for j in batch:
                if j.future.done():
                    continue
                if len(batch) > 1 and not j.streamed:
                    self._run([j])
                elif len(batch) > 1 and out_of_memory_now:  # streamed in part: it cannot start again
                    j.future.set_exception(CutShort(
                        f"the reply was cut short: the batch it shared with {len(batch) - 1} other request(s) ran out "
                        f"of device memory ({first_line(failure)}); send the request again"))
                else:
                    j.future.set_exception(failure)
        finally:
            if cm.device.type == "cuda":
                torch.cuda.empty_cache()

    def _generate(self, batch: list[Job]) -> None:
        cm = self.cm
        eos = set(cm.eos_token_ids)
        tokens: list[list[int]] = [[] for _ in batch]
        reasons: list[str | None] = [None] * len(batch)
        decoders = [StreamDecoder(cm.tokenizer, j.stop) if j.on_text or j.stop else None for j in batch]
        cut_short = False  # the server began to stop before every row finished

        def finish(i: int) -> None:
            """Answer row i's request as soon as it ends: not after the batch's longest reply."""
            job = batch[i]
            if job.future.done():
                return
            if job.on_text and not job.cancelled:
                rest = decoders[i].flush()
                if rest:
                    job.streamed = True
                    job.on_text(rest)
            text = decode_reply(cm.tokenizer, tokens[i]) if decoders[i] is None else decoders[i].text()
            if job.cancelled:
                self.cancelled += 1
            else:
                self.served += 1
            job.future.set_result(Result(text, len(job.prompt), len(tokens[i]), reasons[i] or "length"))

        def on_token(col):
            nonlocal cut_short
            for i, token in enumerate(col.tolist()):
                if reasons[i] is not None:
                    continue
                job = batch[i]
                if token in eos:
                    reasons[i] = "stop"
                else:
                    tokens[i].append(token)
                    if decoders[i] is not None and not job.cancelled:
                        new = decoders[i].push(token)
                        if new and job.on_text:
                            job.streamed = True
                            job.on_text(new)
                        if decoders[i].stopped:
                            reasons[i] = "stop"
                    if reasons[i] is None and len(tokens[i]) >= job.max_new_tokens:
                        reasons[i] = "length"
                if reasons[i] is not None and not job.cancelled:
                    finish(i)
            if all(reasons[i] is not None or j.cancelled for i, j in enumerate(batch)):
                raise _AllFinished
            if self.closing:
                cut_short = True
                raise _AllFinished

        enc = left_pad([j.prompt for j in batch], cm.pad_token_id)
        enc = {k: v.to(cm.device) for k, v in enc.items()}
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            generate(cm.model, enc["input_ids"], enc["attention_mask"],
                     max_new_tokens=max(j.max_new_tokens for j in batch), eos_token_ids=cm.eos_token_ids,
                     pad_token_id=cm.pad_token_id, do_sample=[j.do_sample for j in batch],
                     temperature=[j.temperature for j in batch], top_p=[j.top_p for j in batch],
                     sample_keys=[j.sample_key for j in batch], on_token=on_token,
                     keep_decoder=True)
        except _AllFinished:
            pass
        for i, job in enumerate(batch):
            if cut_short and reasons[i] is None:
                # Not flushed: the text held back may be the start of a stop string, which a stream never sends.
                self._end_unfinished(job)
                continue
            finish(i)


# ---------------------------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


DEEP_JSON = "the body nests arrays or objects too deeply for the JSON parser; a request needs no more than 5 levels"
SURROGATE = "holds an unpaired surrogate escape (\\ud800-\\udfff), which is not text"


def _check_text(value: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"); Python decodes it into a str the tokenizer cannot take.
    if not encodable(value):
        raise ValueError(SURROGATE)
    return value


Text = Annotated[StrictStr, AfterValidator(_check_text)]


def _json_kind(value) -> str:
    """What a JSON value is, for an error saying what came instead of what was expected."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {int: "a number", float: "a number", str: "a string", list: "a list"}.get(type(value), "an object")


def _wrong_shape(expected: str, got: str):
    # Raised from a "before" validator of a union-typed field: pydantic's own error would list each member's failure
    # under its internal name (`stop.list[function-after[_check_text(), str]].0: ...`); this is one line per field.
    raise PydanticCustomError("invalid_type", "{expected}; got {got}", {"expected": expected, "got": got})


CONTENT_EXPECTED = 'only text is supported (a string, or a list of {"type": "text", "text": ...} parts)'
STOP_EXPECTED = f"expected a string or a list of up to {MAX_STOP_STRINGS} strings"


class ApiRequest(_Strict):
    """ChatGLM2-6B api.py's request."""

    prompt: Text
    history: list[tuple[Text, Text]] | None = None
    max_length: StrictInt | None = Field(None, ge=1)
    # Strict numbers (a whole number is one too): a string or `true` is a mistake, not a temperature of 1.
    top_p: StrictFloat | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    temperature: StrictFloat | None = Field(None, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # newer OpenAI clients send developer for system
    content: StrictStr | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            _wrong_shape(CONTENT_EXPECTED, _json_kind(content))
        for part in content:
            if not isinstance(part, dict):
                _wrong_shape(CONTENT_EXPECTED, f"{_json_kind(part)} in the list")
            kind = part.get("type")
            if kind != "text":
                _wrong_shape(CONTENT_EXPECTED, "a part with no type" if kind is None else f"a part of type {kind}"
                             if isinstance(kind, str) else f"a part whose type is {_json_kind(kind)}")
            if not isinstance(part.get("text"), str):
                _wrong_shape(CONTENT_EXPECTED, "a text part with no text" if "text" not in part else
                             f"a text part whose text is {_json_kind(part['text'])}")
        return content

    @field_validator("content")
    @classmethod
    def _encodable_content(cls, content):
        # Checked here rather than with Text in the union, so the error names messages.N.content alone.
        texts = [content] if isinstance(content, str) else [p.text for p in content or []]
        for text in texts:
            _check_text(text)
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None


# Fields of OpenAI's chat completion request that would change the reply and that this server does not do, with
# the values that leave them off (what clients send by default): any other value is refused, naming the field,
# rather than answered as if it had not been asked.
NOT_DONE = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
            "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "tools": (None, []),
            "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
            "response_format": (None, {"type": "text"})}


class ChatCompletionRequest(_Strict):
    """The part of OpenAI's chat completion request that applies here; fields that would change the reply and are
    not done here are refused (NOT_DONE), others ignored."""

    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: StrictFloat | None = Field(None, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stream: StrictBool | None = False  # OpenAI's spec allows null for both: the defaults
    stream_options: StreamOptions | None = None  # streaming only: a whole reply always carries its usage
    n: StrictInt | None = Field(1, ge=1, le=1)
    seed: StrictInt | None = Field(None, ge=-2**63, le=2**64 - 1)  # what torch.Generator accepts
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    @field_validator(*NOT_DONE)
    @classmethod
    def _not_done(cls, value, info):
        off = NOT_DONE[info.field_name]
        if value not in off:
            raise ValueError(f"{json.dumps(value)[:80]} is not done by this server (the reply would ignore it); leave "
                             f"it out or send {' or '.join(json.dumps(o) for o in off)}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, stop):
        if not (stop is None or isinstance(stop, (str, list))):
            _wrong_shape(STOP_EXPECTED, _json_kind(stop))
        for s in stop if isinstance(stop, list) else ():
            if not isinstance(s, str):
                _wrong_shape(STOP_EXPECTED, f"a list holding {_json_kind(s)}")
        return stop

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, not {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        for s in stops:  # here, not with Text in the union, so the error names the field alone
            _check_text(s)
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class RequestError(Exception):
    """A request that is well-formed JSON but cannot be served; becomes a 4xx with this message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.extra = extra  # more fields of the error object, for clients that act on them (the chat page)


def messages_to_turns(messages: list[Message]) -> tuple[str | None, list[tuple[str, str]], str]:
    """(system, history, query) from OpenAI messages.

    System messages are joined into one system text. The rest must end with a user message; user and
    assistant messages pair up into [question, answer] turns (consecutive messages of one role are
    joined by newlines, an answer with no question before it gets an empty question).
    """
    system = "\n".join(m.text() for m in messages if m.role in SYSTEM_ROLES) or None
    turns: list[list[str]] = []  # [role, text] runs of one role
    for m in messages:
        if m.role in SYSTEM_ROLES:
            continue
        if turns and turns[-1][0] == m.role:
            turns[-1][1] += "\n" + m.text()
        else:
            turns.append([m.role, m.text()])
    if not turns or turns[-1][0] != "user":
        raise RequestError(400, "messages must end with a message whose role is 'user'", "messages",
                           "invalid_messages")
    query = turns.pop()[1]
    history, question = [], None
    for role, text in turns:
        if role == "user":
            question = text
        else:
            history.append((question or "", text))
            question = None
    if question is not None:  # a user message answered by nothing: keep it with an empty answer
        history.append((question, ""))
    return system, history, query


def is_greedy(temperature: float | None) -> bool:
    return temperature is None or temperature <= 0


# ---------------------------------------------------------------------------------------------- the app


class BodyCheck:
    """Pure ASGI middleware: reads each request body whole before any parsing, and refuses one over `limit`
    bytes (413), one not all arrived within `timeout` seconds (408), or a POST body, always JSON here, that is
    not UTF-8 (422, as for a body that is not JSON)."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, int(limit), float(timeout)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if scope.get("method") == "POST":
            # Every POST body here is JSON; read it as such whatever Content-Type says, as api.py did
            # (`curl -d` labels its data as a form).
            headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]
            scope = {**scope, "headers": headers}
        length = dict(headers).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse_size(send)
        chunks: list[dict] = []
        try:
            # A client that stops sending mid-body would otherwise hold its connection and this task for good.
            cut_short = await asyncio.wait_for(self._read(receive, chunks), self.timeout)
        except asyncio.TimeoutError:
            return await self._refuse(send, 408, f"the request body did not all arrive within body_timeout_s="
                                      f"{self.timeout:g} seconds", "body_timeout", [(b"connection", b"close")])
        if cut_short is None:
            return await self._refuse_size(send)
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        if scope.get("method") == "POST" and not cut_short:  # (a client that went away sent only part of it)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as e:
                # JSON between systems is UTF-8 (RFC 8259); without this FastAPI answers a bare "There was an
                # error parsing the body".
                return await self._refuse(send, 422, f"the body is not UTF-8 (byte 0x{body[e.start]:02x} at "
                                          f"offset {e.start}); send JSON encoded as UTF-8", "invalid_encoding")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _read(self, receive, chunks: list) -> bool | None:
        """Receives the body's messages into `chunks`: whether the body was cut short (the client went away),
        or None once it passes `limit` bytes."""
        size = 0
        while True:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":
                return True
            size += len(message.get("body", b""))
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return False

    async def _refuse_size(self, send):
        # Closed after the answer: the rest of the body was never read.
        await self._refuse(send, 413, f"request body is larger than max_body_bytes={self.limit} bytes",
                           "request_too_large", [(b"connection", b"close")])

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str, headers: list | None = None):
        payload = json.dumps(error_body(message, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": payload})


class KeyCheck:
    """Pure ASGI middleware: refuses a request without the API key (401) before anything else about it is
    checked, so that a client without the key gets the same answer whatever its body (no 413, 408 or 422
    telling how the server reads one). The chat page's files (PAGE_PATHS) need no key; every other path does,
    one added later included."""

    def __init__(self, app, key: str, limit: int, timeout: float):
        self.app, self.key, self.limit, self.timeout = app, key.encode(), int(limit), float(timeout)

    def _open(self, scope) -> bool:
        path = scope.get("path", "")
        return scope.get("method") in ("GET", "HEAD") and (path in PAGE_PATHS or path.startswith("/web/"))

    def _sent_key(self, scope) -> bool:
        header = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._open(scope) or self._sent_key(scope):
            return await self.app(scope, receive, send)
        body = error_body("missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                          "invalid_api_key", kind="authentication_error")
        headers = {"WWW-Authenticate": "Bearer"}
        if not await self._dropped(receive):
            headers["Connection"] = "close"  # the rest of the body stays unread
        await JSONResponse(body, status_code=401, headers=headers)(scope, receive, send)

    async def _dropped(self, receive) -> bool:
        """Reads the body and throws it away, within the body limits: a connection closed while its client is
        still sending is reset, and the client sees the reset instead of the 401. False past the limits."""
        async def read() -> bool:
            size = 0
            while True:
                message = await receive()
                size += len(message.get("body", b""))
                if message["type"] != "http.request" or size > self.limit:
                    return False
                if not message.get("more_body"):
                    return True
        try:
            return await asyncio.wait_for(read(), self.timeout)
        except asyncio.TimeoutError:
            return False


class CutOff:
    """Outermost ASGI layer: once a stopping server's shutdown_timeout_s runs out, uvicorn cancels the requests
    still in progress (a body still arriving, a client not reading its stream) and would log each as a crash of
    the application, traceback and all. Here each is one line, and a client whose answer had not begun gets a 503
    saying why."""

    def __init__(self, app, engine: Engine):
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send):
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            if scope["type"] != "http" or not self.engine.closing:
                raise
            log.warning("%s %s cut off: the server is stopping and shutdown_timeout_s ran out", scope.get("method"),
                        scope.get("path"))
            if not started:
                await JSONResponse(error_body(SHUTTING_DOWN, "server_shutting_down", kind="server_error"),
                                   status_code=503, headers={"Connection": "close"})(scope, receive, send)


def error_body(message: str, code: str | None = None, param: str | None = None,
               kind: str = "invalid_request_error", extra: dict | None = None) -> dict:
    """Errors in OpenAI's shape, plus FastAPI's `detail` so either kind of client finds the message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code, **(extra or {})},
            "detail": message}


def _describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    parts, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            parts.append(f"the body is not valid JSON ({ctx.get('error', e.get('msg'))})")
            continue
        name = ".".join(loc) or "body"
        first = first or (loc[0] if loc else None)
        message = str(e.get("msg"))
        if e.get("type") == "value_error":  # pydantic's label on a ValueError raised by a check of ours
            message = message.removeprefix("Value error, ")
        parts.append(f"{name}: {message}")
    return "; ".join(parts), first


def default_model_name(cm: ChatModel) -> str:
    """`<run folder>/checkpoint-N` for a checkpoint, the base model's folder name without one."""
    if cm.checkpoint:
        path = Path(cm.checkpoint).resolve()
        return f"{path.parent.name}/{path.name}"
    return Path(cm.base_path).resolve().name


def create_app(cm: ChatModel, cfg: DictConfig, engine: Engine | None = None):
    """The FastAPI app around a loaded model (the tests build it in-process)."""
    engine = engine or Engine(cm, cfg.max_batch_size, cfg.batch_wait_ms, cfg.max_queue, cfg.seed)
    api_key = api_key_of(cfg)
    model_name = cfg.get("model_name") or default_model_name(cm)
    prompts = Prompts(cm, int(cfg.max_prompt_tokens), int(cfg.max_new_tokens))
    app = FastAPI(title="ptune", version="1", lifespan=_lifespan(prompts, engine), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.state.model_name = model_name
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestError, _on_request_error)
    _add_chatglm_api(app, cfg, engine, prompts)
    _add_openai_api(app, cfg, engine, prompts, model_name)
    _add_health(app, cm, engine, prompts, model_name, auth=api_key is not None)
    _add_page(app)
    return _with_middleware(app, cfg, engine, api_key)


def _lifespan(prompts: Prompts, engine: Engine):
    @asynccontextmanager
    async def lifespan(app):
        yield
        prompts.close()
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    return lifespan


class Prompts:
    """Builds each request's prompt and holds prompt and reply to the server's caps (max_prompt_tokens,
    max_new_tokens) and the model's positions, refusing what does not fit in words a client can act on."""

    def __init__(self, cm: ChatModel, max_prompt: int, max_new: int):
        self.cm, self.max_prompt, self.max_new = cm, max_prompt, max_new
        self.positions, self.positions_key = cm.max_positions, cm.positions_key
        # The most tokens a prompt may have: the server's cap, and one position left for the reply.
        self.prompt_limit = max_prompt if self.positions is None else min(max_prompt, self.positions - 1)
        # Tokenizing a prompt near max_body_bytes takes up to a second or two; on the event loop it would stall every
        # other client's stream meanwhile. One thread: prompts wait for each other, never for the streams, and
        # encoding stays one call at a time as it was on the loop.
        self.tokenizing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptune-prompts")

    async def prompt_for(self, query: str, history, system: str | None = None, param: str = "messages") -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, self.checked_prompt, query, history,
                                                                system, param)

    def close(self) -> None:
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    def checked_prompt(self, query: str, history, system: str | None, param: str) -> list[int]:
        try:
            ids = build_prompt(self.cm.tokenizer, self.cm.template, query, history, system)
        except DataError as e:  # the chat template refuses the messages
            raise RequestError(400, str(e), param, "unsupported_messages") from None
        # A template's role tokens make an empty query more than 0 tokens, yet there is still nothing to answer;
        # nor is there in spaces and newlines alone.
        if not query.strip() or not ids:
            raise RequestError(400, "the prompt is empty; send some text", param, "empty_prompt")
        if self.too_long(len(ids)):
            raise self.overlong(len(ids), query, history, system, param)
        return ids

    def too_long(self, prompt: int) -> bool:
        return prompt > self.prompt_limit

    def limit_of(self, prompt: int) -> str:
        """What a prompt of `prompt` tokens, too long, is over."""
        if prompt > self.max_prompt:
            return f"this server accepts at most {self.max_prompt} (max_prompt_tokens)"
        return (f"the model's {self.positions} positions ({self.positions_key}) hold prompt and reply together, "
                "which leaves no room for a reply")

    def overlong(self, prompt: int, query: str, history, system: str | None, param: str) -> RequestError:
        """The refusal of a prompt of `prompt` tokens, too long here, with what would fit, for clients to act on
        (the chat page does) as well as in words. The error object holds `prompt_tokens`; `prompt_limit`, the
        most a prompt may have; `system_too_long`: the system message alone makes a prompt too long, so no
        shorter message or history could help; and `turns_to_leave_out`: the fewest oldest turns of the history
        ([question, answer] pairs as they were paired here) whose leaving out makes the prompt fit, null where
        leaving out all of it would not."""
        alone = len(build_prompt(self.cm.tokenizer, self.cm.template, "", [], system)) if system else 0
        extra = {"prompt_tokens": prompt, "prompt_limit": self.prompt_limit,
                 "system_too_long": bool(system) and self.too_long(alone), "turns_to_leave_out": None}
        if extra["system_too_long"]:
            return RequestError(400, f"the system message alone makes a prompt of {alone} tokens; "
                                f"{self.limit_of(alone)}; shorten the system message", param,
                                "context_length_exceeded", extra)
        extra["turns_to_leave_out"] = self.turns_to_leave_out(query, history, system)
        return RequestError(400, f"the prompt is {prompt} tokens (history included); {self.limit_of(prompt)}", param,
                            "context_length_exceeded", extra)

    def turns_to_leave_out(self, query: str, history, system: str | None, limit: int | None = None) -> int | None:
        """The fewest oldest turns of `history` whose leaving out makes the prompt fit (in `limit` tokens, else the
        prompt limit); None where none would."""
        limit = self.prompt_limit if limit is None else limit
        ids, kept = fit_history(self.cm.tokenizer, self.cm.template, query, history, limit, system)
        return None if not history or len(ids) > limit else len(history) - len(kept)

    async def fit_reply(self, prompt: int, new: int, asked: str | None, param: str | None, turns=()) -> int:
        """`new` reply tokens, or as many as the model's positions leave where the request named no length
        (`asked` None). A length asked for past the positions is refused here, before the request joins a
        batch: generation would fail with an IndexError, and fail every request batched with it. `turns`
        (query, history, system) lets the refusal say how many oldest turns to leave out for the reply to fit, as
        a prompt's refusal does (worked out on the tokenizing thread)."""
        positions = self.positions
        if positions is None or prompt + new <= positions:
            return new
        if asked is None:
            return positions - prompt
        extra = None
        if turns:  # the same fields as a prompt's refusal; no turn helps where the reply alone fills the positions
            leave_out = None if positions - new <= 0 else await asyncio.get_running_loop().run_in_executor(
                self.tokenizing, self.turns_to_leave_out, *turns, positions - new)
            extra = {"prompt_tokens": prompt, "prompt_limit": max(0, positions - new), "system_too_long": False,
                     "turns_to_leave_out": leave_out}
        raise RequestError(400, f"the prompt is {prompt} tokens and {asked}: {prompt} + {new} > the model's "
                           f"{positions} positions ({self.positions_key}), which hold prompt and reply together; at "
                           f"most {positions - prompt} new tokens fit", param, "context_length_exceeded", extra)

    def capped(self, new: int) -> str:
        return f" (max_new_tokens={self.max_new} caps a reply)" if new > self.max_new else ""


# -- running a request's job


def submit_job(engine: Engine, job: Job) -> None:
    try:
        engine.submit(job)
    except QueueFull as e:
        raise RequestError(503, str(e), code="server_busy") from None
    except ShuttingDown as e:
        raise RequestError(503, str(e), code="server_shutting_down") from None


def out_of_memory(job: Job, error: Exception) -> str:
    """A request that ran out of device memory even alone: what it asked for, and what would fit."""
    return (f"out of device memory generating a reply of up to {job.max_new_tokens} tokens to a prompt of "
            f"{len(job.prompt)} tokens ({first_line(error)}); ask for a shorter reply or send a shorter prompt")


async def run_job(engine: Engine, job: Job, request: Request) -> Result:
    submit_job(engine, job)
    result = asyncio.wrap_future(job.future)
    try:
        # The server never cancels a handler whose client hung up; without this check an abandoned
        # request would keep its batch row (or its place in the queue) to the end.
        while not (await asyncio.wait({result}, timeout=0.1))[0]:
            if await request.is_disconnected():
                job.cancelled = True
                # Nobody reads this answer; 499 is what proxies log for a client that closed the request.
                raise RequestError(499, "the client closed the request", code="cancelled")
        return await result
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    except RequestError:  # the 499 above: the client's doing, which a 500 would log as the server's
        raise
    except ShuttingDown as e:
        raise RequestError(503, str(e), code="server_shutting_down") from None
    except torch.OutOfMemoryError as e:  # the request's size, not a fault of the server
        raise RequestError(503, out_of_memory(job, e), code="out_of_memory") from None
    except Exception as e:  # the worker logged it; the client gets the reason
        raise RequestError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed") from None


def sampling_params(temperature: float | None, top_p: float | None, default_top_p: float) -> dict:
    if is_greedy(temperature):
        return {"do_sample": False, "temperature": 1.0, "top_p": 1.0}
    return {"do_sample": True, "temperature": float(temperature),
            "top_p": float(default_top_p if top_p is None else top_p)}


# -- errors


async def _on_invalid(request: Request, exc: RequestValidationError):
    message, param = _describe_validation(list(exc.errors()))
    body = error_body(message, "invalid_request", param)
    body["errors"] = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                      for e in exc.errors()]
    return JSONResponse(body, status_code=422)


async def _on_http_error(request: Request, exc: StarletteHTTPException):
    # FastAPI's own refusals (e.g. a body it cannot decode) in the same shape as every other error.
    if isinstance(exc.__cause__, RecursionError):
        # Valid JSON that Python's parser gives up on: FastAPI would say only "There was an error parsing
        # the body".
        return JSONResponse(error_body(DEEP_JSON, "json_too_deep"), status_code=exc.status_code,
                            headers=exc.headers)
    if isinstance(exc.__cause__, ValueError) and "integer string conversion" in str(exc.__cause__):
        # (only Pythons with the digit limit raise this, so only they are asked for it)
        message = (f"the body holds a number of more than {sys.get_int_max_str_digits()} digits, which Python's "
                   "JSON parser does not read; no field takes a number that long")
        return JSONResponse(error_body(message, "number_too_long"), status_code=exc.status_code, headers=exc.headers)
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def _on_request_error(request: Request, exc: RequestError):
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    # A full queue drains within moments; a server shutting down is back no sooner than its model loads.
    headers = {"Retry-After": "1"} if exc.code == "server_busy" else None
    return JSONResponse(error_body(exc.message, exc.code, exc.param, kind, exc.extra), status_code=exc.status,
                        headers=headers)


# -- the routes


def _add_chatglm_api(app: FastAPI, cfg: DictConfig, engine: Engine, prompts: Prompts) -> None:
    """ChatGLM2-6B api.py's `POST /`."""

    @app.post("/")
    async def chatglm_api(req: ApiRequest, request: Request):
        history = [tuple(t) for t in (req.history or [])]
        ids = await prompts.prompt_for(req.prompt, history, param="prompt")
        max_length = req.max_length or int(cfg.api.max_length)
        room = max_length - len(ids)
        if room < 1:
            raise RequestError(400, f"the prompt is {len(ids)} tokens and max_length is {max_length}: no room for a "
                               "reply (max_length counts prompt and reply tokens)", "max_length",
                               "context_length_exceeded")
        new = min(room, prompts.max_new)
        asked = (None if req.max_length is None else
                 f"max_length={max_length} leaves {new} for the reply{prompts.capped(room)}")
        new = await prompts.fit_reply(len(ids), new, asked, "max_length")
        temperature = cfg.api.temperature if req.temperature is None else req.temperature
        job = Job(ids, new, **sampling_params(temperature, req.top_p, float(cfg.api.top_p)))
        result = await run_job(engine, job, request)
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        history = [list(t) for t in history] + [[req.prompt, result.text]]
        log.info("POST / prompt %d tokens -> %d tokens (%s)", result.prompt_tokens, result.completion_tokens,
                 result.finish_reason)
        return {"response": result.text, "history": history, "status": 200, "time": now}


def _add_openai_api(app: FastAPI, cfg: DictConfig, engine: Engine, prompts: Prompts, model_name: str) -> None:
    """The OpenAI-compatible `/v1/models` and `/v1/chat/completions`."""
    created = int(time.time())

    def model_object() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "ptune"}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [model_object()]}

    # `:path`, as the default id (<run folder>/checkpoint-N) holds a slash; OpenAI's client sends it as %2F,
    # which arrives decoded.
    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str):
        if model_id != model_name:
            raise RequestError(404, f"no model {model_id!r} here: this server serves {model_name!r} alone",
                               "model", "model_not_found")
        return model_object()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        system, history, query = messages_to_turns(req.messages)
        ids = await prompts.prompt_for(query, history, system)
        param = "max_tokens" if req.max_tokens else "max_completion_tokens" if req.max_completion_tokens else None
        wanted = req.max_tokens or req.max_completion_tokens or int(cfg.openai.max_tokens)
        new = min(wanted, prompts.max_new)
        asked = None if param is None else f"{param}={wanted} asks for {new} more{prompts.capped(wanted)}"
        new = await prompts.fit_reply(len(ids), new, asked, param, (query, history, system))
        temperature = cfg.openai.temperature if req.temperature is None else req.temperature
        params = sampling_params(temperature, req.top_p, float(cfg.openai.top_p))
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        stamp = int(time.time())
        job = Job(ids, new, seed=req.seed, stop=req.stop_strings(), **params)
        if req.stream:
            return _stream_completion(engine, job, req, cid, stamp, model_name)
        result = await run_job(engine, job, request)
        log.info("POST /v1/chat/completions prompt %d tokens -> %d tokens (%s)", result.prompt_tokens,
                 result.completion_tokens, result.finish_reason)
        return {"id": cid, "object": "chat.completion", "created": stamp, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": result.usage()}


# Line breaks to Python's str.splitlines (and JavaScript's line terminators), which SSE readers that split the
# stream that way (httpx's iter_lines, some hand-written clients) would break an event's JSON at; escaped, the
# JSON means the same.
# (json.dumps escapes the C0 control characters itself.)
_LINE_BREAKS_IN_TEXT = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse_event(body: dict) -> str:
    """One server-sent event: the text as it is (not \\u-escaped), except characters some readers split lines at."""
    return f"data: {json.dumps(body, ensure_ascii=False).translate(_LINE_BREAKS_IN_TEXT)}\n\n"


def _stream_completion(engine: Engine, job: Job, req: ChatCompletionRequest, cid: str, stamp: int,
                       model_name: str) -> StreamingResponse:
    """Submits `job` and answers with its text as server-sent events, as it comes from the worker."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    done = object()
    job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, done))
    submit_job(engine, job)

    # include_usage asks for OpenAI's shape: `"usage": null` on every chunk, then the usage in a chunk of
    # its own (no choices) after the finish_reason one. Without it the usage rides on the finish_reason
    # chunk, as it did before include_usage was read: clients of this server may take it from there.
    usage_alone = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {"id": cid, "object": "chat.completion.chunk", "created": stamp, "model": model_name,
                "choices": choices}
        if usage_alone or usage is not None:
            body["usage"] = usage
        return sse_event(body)

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                piece = await pieces.get()
                if piece is done:
                    break
                yield chunk({"content": piece})
            if job.future.cancelled():
                yield sse_event(error_body('the request was cancelled', 'cancelled'))
            elif isinstance(job.future.exception(), ShuttingDown):
                message = f"the reply was cut short: {job.future.exception()}"
                yield sse_event(error_body(message, 'server_shutting_down', kind='server_error'))
            elif isinstance(job.future.exception(), (torch.OutOfMemoryError, CutShort)):
                exc = job.future.exception()
                message = str(exc) if isinstance(exc, CutShort) else out_of_memory(job, exc)
                yield sse_event(error_body(message, 'out_of_memory', kind='server_error'))
            elif job.future.exception() is not None:
                message = f"generation failed: {job.future.exception()}"
                yield sse_event(error_body(message, 'generation_failed'))
            else:
                r = job.future.result()
                if usage_alone:
                    yield chunk({}, r.finish_reason)
                    yield chunk(None, usage=r.usage())
                else:
                    yield chunk({}, r.finish_reason, r.usage())
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a client that went away stops costing generation steps

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _add_health(app: FastAPI, cm: ChatModel, engine: Engine, prompts: Prompts, model_name: str, auth: bool) -> None:
    # HEAD too: uptime monitors and load balancers often probe with it
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "model": model_name, "checkpoint": cm.checkpoint, "step": cm.step,
                "base": cm.base_path, "template": cm.template, "device": str(cm.device),
                "prefix_length": (cm.prefix_config or {}).get("prefix", {}).get("length"),
                "max_prompt_tokens": prompts.max_prompt, "max_new_tokens": prompts.max_new,
                "max_positions": prompts.positions, "max_batch_size": engine.max_batch_size,
                "queued": engine.pending(), "batches": engine.batches, "largest_batch": engine.largest_batch,
                "served": engine.served, "cancelled": engine.cancelled, "auth": auth}


def _add_page(app: FastAPI) -> None:
    """The chat page (static files; the page itself holds no data, so it needs no key: PAGE_PATHS)."""
    web = resources.files("ptune") / "web"
    page_headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                               "form-action 'none'; frame-ancestors 'none'",
                    "Cache-Control": "no-cache"}

    @app.api_route("/", methods=["GET", "HEAD"])
    @app.api_route("/chat", methods=["GET", "HEAD"])
    async def page():
        return FileResponse(str(web / "index.html"), media_type="text/html; charset=utf-8", headers=page_headers)

    @app.api_route("/web/{name}", methods=["GET", "HEAD"])
    async def web_file(name: str):
        if name not in WEB_FILES:
            return JSONResponse(error_body(f"no such file: {name}", "not_found"), status_code=404)
        return FileResponse(str(web / name), media_type=WEB_FILES[name], headers=page_headers)

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"])
    async def favicon():
        return Response(status_code=204)


def _with_middleware(app: FastAPI, cfg: DictConfig, engine: Engine, api_key: str | None):
    """`app` inside the body check, the key check where there is a key, CORS where origins are named, and CutOff."""
    checked = BodyCheck(app, int(cfg.max_body_bytes), float(cfg.body_timeout_s))
    if api_key is not None:
        checked = KeyCheck(checked, api_key, int(cfg.max_body_bytes), float(cfg.body_timeout_s))
    origins = list(cfg.get("cors_origins") or [])
    if not origins:
        return CutOff(checked, engine)
    # Outside the key and body checks, so that their refusals (401, 413, 408, 422) reach a page on another origin
    # readable too.
    from starlette.middleware.cors import CORSMiddleware

    # Any request headers: clients send headers of their own on every request (OpenAI's JS SDK its x-stainless-*
    # ones), and a preflight asking for one not listed fails the request. The origins are what guards the API.
    return CutOff(CORSMiddleware(checked, allow_origins=origins, allow_methods=["GET", "HEAD", "POST"],
                                 allow_headers=["*"], max_age=600), engine)


def is_loopback(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


def _check_exposure(cfg: DictConfig) -> None:
    loopback = is_loopback(str(cfg.host))
    if not loopback and not api_key_of(cfg):
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model; set "
                    "api_key=... or %s", cfg.host, API_KEY_ENV)


LOCALHOST = ("127.0.0.1", "::1")
NO_IPV6 = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)  # from binding ::1 without IPv6


def _bind(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def _cannot_listen(host: str, address: str, port: int, e: OSError) -> ConfigError:
    where = "there" if address == host else f"on {address}"
    if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:  # the host is at fault, not the port
        return ConfigError(f"host={host}: cannot listen there ({e.strerror or e}); expected an address of this "
                           "machine (127.0.0.1, ::1, localhost, or 0.0.0.0 for every interface)")
    return ConfigError(f"host={host} port={port}: cannot listen {where} ({e.strerror or e}); pick another port "
                       "(port=0 lets the system choose a free one)")


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, bound before the model loads: a port already taken is reported at once, not
    after minutes of loading; with port=0 the system picks one, which the startup line then names.

    `localhost` is both loopback addresses, 127.0.0.1 and ::1 where the machine has IPv6: clients resolve
    the name to either, and some try only the first address they get (Node.js before 20 did), so a server
    on one alone refuses them. uvicorn's own `--host localhost` binds 127.0.0.1 alone."""
    if host.lower() != "localhost":
        try:
            return [_bind(host, port)]
        except OSError as e:
            raise _cannot_listen(host, host, port, e) from None
    v4_address, v6_address = LOCALHOST
    for _ in range(20):
        try:
            v4 = _bind(v4_address, port)
        except OSError as e:
            raise _cannot_listen(host, v4_address, port, e) from None
        try:
            return [v4, _bind(v6_address, v4.getsockname()[1])]
        except OSError as e:
            if e.errno in NO_IPV6:
                log.debug("no IPv6 loopback here (%s): localhost is served on %s alone", e.strerror, v4_address)
                return [v4]
            v4.close()
            if not (port == 0 and e.errno == errno.EADDRINUSE):
                raise _cannot_listen(host, v6_address, port, e) from None
            # The port the system picked on 127.0.0.1 is taken on ::1: ask for another.
    raise ConfigError(f"host={host} port=0: found no port free on both {v4_address} and {v6_address}")


def server_url(host: str, port: int) -> str:
    if ":" in host:  # an IPv6 address goes in brackets (RFC 3986), a zone's % escaped (RFC 6874)
        host = f"[{host.replace('%', '%25')}]"
    return f"http://{host}:{port}/"


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings.serve(cfg)  # python -m ptune.serve checked them before this module's imports; other callers did not
    import uvicorn

    setup_logging()
    sockets = listen_sockets(str(cfg.host), int(cfg.port))
    cm = load_chat_model(cfg)
    _check_exposure(cfg)
    engine = Engine(cm, cfg.max_batch_size, cfg.batch_wait_ms, cfg.max_queue, cfg.seed)
    app = create_app(cm, cfg, engine)
    config = uvicorn.Config(app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level),
                            access_log=True, timeout_graceful_shutdown=float(cfg.shutdown_timeout_s))
    addresses = " and ".join(s.getsockname()[0] for s in sockets)
    log.info("serving %s at %s (%schat page at /, API at / and /v1/chat/completions)", cm.describe(),
             server_url(str(cfg.host), sockets[0].getsockname()[1]),
             f"listening on {addresses}; " if len(sockets) > 1 else "")
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    # uvicorn shuts down cleanly on SIGTERM, then raises it again: with the default action the exit status
    # says "ended by SIGTERM", the clean stop service managers expect, not the interrupt of a start-up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # uvicorn lets every response in progress end before it stops, and only then tells the app: the
            # replies being generated must end first, or a long one would hold the stop for minutes.
            engine.shut_down()
            await super().shutdown(sockets)

    Server(config).run(sockets=sockets)

