"""The HTTP server on a tiny model with a prefix trained through the CLI: both request shapes, streaming,
batching under 32 concurrent clients, bad requests, and the API key (through the real command line)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import LiveServer, free_socket
from omegaconf import OmegaConf

from ptune.chat import build_prompt, load_chat_model
from ptune.checkpoint import CheckpointError
from ptune.data import prompt_ids
from ptune.evaluate import predict

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 12  # the server's reply cap in these tests: keeps the tiny random model's replies short


def compose(name: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoint) -> Path:
    return trained_checkpoint


@pytest.fixture(scope="module")
def served(checkpoint):
    from ptune.serve import create_app

    cfg = compose("serve", f"checkpoint={checkpoint}", "device=cpu", f"max_new_tokens={MAX_NEW}",
                  "max_prompt_tokens=200", "max_body_bytes=65536", "max_batch_size=8", "batch_wait_ms=30")
    cm = load_chat_model(cfg)
    live = LiveServer(create_app(cm, cfg))
    yield live.url, cm
    live.stop()


@pytest.fixture(scope="module")
def served_gpt2(tiny_model_dir):
    """A base GPT-2 (512 learned positions) under the plain template, with a long batching window."""
    from ptune.serve import create_app

    cfg = compose("serve", "checkpoint=null", f"model.path={tiny_model_dir('gpt2')}", "model.template=plain",
                  "device=cpu", "max_new_tokens=64", "max_batch_size=8", "batch_wait_ms=300")
    cm = load_chat_model(cfg)
    live = LiveServer(create_app(cm, cfg))
    yield live.url, cm
    live.stop()


def test_messages_the_chat_template_refuses_are_a_400_naming_why(checkpoint):
    """Gemma-2's template raises on a system message; the server answered 500 with no message."""
    from ptune.serve import create_app

    cfg = compose("serve", f"checkpoint={checkpoint}", "device=cpu", "max_new_tokens=2")
    cm = load_chat_model(cfg)
    cm.tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                                  "supported') }}{% endif %}" + cm.tokenizer.chat_template)
    live = LiveServer(create_app(cm, cfg))
    try:
        user = {"role": "user", "content": "hi"}
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "system", "content": "be brief"}, user]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == ("the model's chat template refuses these messages: System role not "
                                                "supported")
        assert r.json()["error"]["code"] == "unsupported_messages"
        assert httpx.post(live.url + "/v1/chat/completions", json={"messages": [user]}, timeout=60).status_code == 200
    finally:
        live.stop()


def greedy(cm, prompt: list[int], max_new_tokens: int = MAX_NEW) -> str:
    """What `python -m ptune.evaluate` generates for this prompt."""
    gen = OmegaConf.create({"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "compile_step": False,
                            "seed": 0, "extra_eos_token_ids": []})
    texts, _ = predict(cm.model, cm.tokenizer, [prompt], gen, 1, cm.device, progress=False)
    return texts[0]


def sse(lines) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded except the final [DONE]."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chatglm_api_shape_greedy_equals_evaluate(served):
    url, cm = served
    history = [["商品是什么", "一条裙子"]]
    prompt = "类型#裙*颜色#红色"
    ids = prompt_ids(cm.tokenizer, prompt, history, cm.template)
    budget = len(ids) + 7  # max_length counts the prompt: 7 new tokens at most
    r = httpx.post(url + "/", json={"prompt": prompt, "history": history, "max_length": budget, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert body["response"] == greedy(cm, ids, 7)
    assert body["history"] == history + [[prompt, body["response"]]]
    # Defaults of api.py (sampled), history absent: still a well-formed answer with the turn recorded.
    r = httpx.post(url + "/", json={"prompt": prompt}, timeout=60)
    assert r.status_code == 200 and r.json()["history"] == [[prompt, r.json()["response"]]]


def test_openai_shape_and_stream_equal_evaluate(served):
    url, cm = served
    messages = [{"role": "user", "content": "颜色#白色"}, {"role": "assistant", "content": "白色上衣"},
                {"role": "user", "content": "材质#棉"}]
    ids = prompt_ids(cm.tokenizer, "材质#棉", [("颜色#白色", "白色上衣")], cm.template)
    want = greedy(cm, ids)
    r = httpx.post(url + "/v1/chat/completions", json={"model": "anything", "messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens"] == len(ids) and body["choices"][0]["finish_reason"] in ("stop", "length")

    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"messages": messages, "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert "".join(pieces) == want and sum(1 for p in pieces if p) > 1  # streamed, not sent whole
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]

    # A system message reaches the template as a system turn.
    with_system = [{"role": "system", "content": "简短"}] + messages
    r = httpx.post(url + "/v1/chat/completions", json={"messages": with_system, "max_tokens": 5}, timeout=60)
    sys_ids = build_prompt(cm.tokenizer, cm.template, "材质#棉", [("颜色#白色", "白色上衣")], "简短")
    assert r.json()["usage"]["prompt_tokens"] == len(sys_ids) > len(ids)
    assert r.json()["choices"][0]["message"]["content"] == greedy(cm, sys_ids, 5)

    models = httpx.get(url + "/v1/models").json()
    health = httpx.get(url + "/health").json()
    assert models["data"][0]["id"] == health["model"] == body["model"]
    assert health["checkpoint"] == str(cm.checkpoint) and health["step"] == 2
    for path in ("/health", "/", "/chat", "/favicon.ico", "/v1/models", f"/v1/models/{body['model']}"):
        probe = httpx.head(url + path)  # how uptime monitors ask: the GET's status, no body
        assert (probe.status_code, probe.content) == (httpx.get(url + path).status_code, b""), path
        assert probe.status_code in (200, 204), path


def test_seeded_sampling_is_reproducible(served):
    url, _ = served
    req = {"messages": [{"role": "user", "content": "风格#复古"}], "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a = httpx.post(url + "/v1/chat/completions", json=req, timeout=60).json()["choices"][0]["message"]["content"]
    b = httpx.post(url + "/v1/chat/completions", json=req, timeout=60).json()["choices"][0]["message"]["content"]
    assert a == b


def test_a_seeded_request_samples_alike_alone_and_batched_with_others(served_gpt2):
    """Each row draws from its own stream: a seeded request's reply does not depend on the requests that share its
    batch, greedy or sampled with other settings, nor on its place in the batch."""
    from ptune.serve import Engine, Job

    _, cm = served_gpt2
    ids = [prompt_ids(cm.tokenizer, p, [], cm.template) for p in ("类型#裙", "风格#复古*图案#条纹", "hi")]
    seeded = lambda seed=7: Job(ids[0], MAX_NEW, do_sample=True, temperature=1.3, top_p=0.9, seed=seed)  # noqa: E731
    engine = Engine(cm, max_batch_size=8, batch_wait_ms=300)
    try:
        alone = engine.submit(seeded()).future.result(timeout=120).text
        again = [engine.submit(Job(ids[1], MAX_NEW, do_sample=False, temperature=1.0, top_p=1.0)),
                 engine.submit(Job(ids[2], 5, do_sample=True, temperature=0.7, top_p=0.5)),
                 engine.submit(seeded()), engine.submit(seeded(8))]
        replies = [j.future.result(timeout=120).text for j in again]
        assert engine.batches == 2 and engine.largest_batch == 4
        assert replies[2] == alone and replies[0] == greedy(cm, ids[1])
        assert replies[3] != alone  # another seed, another reply (the tiny model's replies are varied)
    finally:
        engine.close()


def test_a_request_that_ends_is_answered_before_its_batch_ends(served_gpt2):
    """A short reply batched with a long one is answered (a stream closed) when it ends, not when the long one does."""
    from ptune.serve import Engine, Job

    _, cm = served_gpt2
    ids = prompt_ids(cm.tokenizer, "类型#裙", [], cm.template)
    assert len(greedy(cm, ids, 40)) >= 30  # the long reply goes on well past the short one's 2 tokens
    engine = Engine(cm, max_batch_size=8, batch_wait_ms=300)
    seen = []
    try:
        greedy_job = dict(do_sample=False, temperature=1.0, top_p=1.0)
        long = Job(ids, 40, on_text=lambda text: seen.append(short.future.done()), **greedy_job)
        short = Job(ids, 2, **greedy_job)
        engine.submit(long)
        engine.submit(short)
        assert long.future.result(timeout=120).completion_tokens == 40
        assert short.future.result().text == greedy(cm, ids, 2) and short.future.result().finish_reason == "length"
        assert engine.batches == 1 and seen[:1] == [False] and seen[-1] and seen.count(True) >= 20
    finally:
        engine.close()


def test_32_concurrent_clients_get_their_own_answers(served):
    url, cm = served
    prompts = [f"类型#裙*长度#{i}*颜色#{'红蓝白黑'[i % 4]}" for i in range(32)]
    want = [greedy(cm, prompt_ids(cm.tokenizer, p, [], cm.template)) for p in prompts]
    before = httpx.get(url + "/health").json()["batches"]

    async def one(client, i):
        p = prompts[i]
        if i % 3 == 0:
            r = await client.post("/", json={"prompt": p, "history": [], "temperature": 0})
            return r.json()["response"]
        req = {"messages": [{"role": "user", "content": p}], "temperature": 0}
        if i % 3 == 1:
            r = await client.post("/v1/chat/completions", json=req)
            return r.json()["choices"][0]["message"]["content"]
        text = ""
        async with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        return text

    async def all_clients():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    got = asyncio.run(all_clients())
    assert got == want
    health = httpx.get(url + "/health").json()
    assert health["largest_batch"] > 1, health  # requests were generated together
    assert health["batches"] - before < 32


def test_bad_requests_are_refused_clearly_and_serving_goes_on(served):
    url, cm = served
    post = lambda path, **kw: httpx.post(url + path, timeout=60, **kw)  # noqa: E731
    r = post("/", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    r = post("/", json={"prompt": "hi", "temperature": "hot"})
    assert r.status_code == 422 and "temperature" in r.json()["detail"] and r.json()["error"]["param"] == "temperature"
    r = post("/", json={"prompt": 5})
    assert r.status_code == 422 and "prompt" in r.json()["detail"]
    r = post("/", json={"prompt": "hi", "history": [["only one side"]]})
    assert r.status_code == 422 and "history" in r.json()["detail"]
    r = post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 422 and "messages.0.role" in r.json()["detail"]
    r = post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": "yes"})
    assert r.status_code == 422 and "stream" in r.json()["detail"]
    r = post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 422 and "messages" in r.json()["detail"]
    r = post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}]})
    assert r.status_code == 400 and "role is 'user'" in r.json()["error"]["message"]
    # Over max_prompt_tokens (200 here): refused with the limit in the message.
    r = post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 500}]})
    assert r.status_code == 400 and "at most 200" in r.json()["error"]["message"]
    r = post("/", json={"prompt": "hi", "history": [["q" * 150, "a" * 100]]})
    assert r.status_code == 400 and "max_prompt_tokens" in r.json()["detail"]
    r = post("/", json={"prompt": "hi", "max_length": 3})
    assert r.status_code == 400 and "max_length" in r.json()["detail"]
    # Over max_body_bytes (64 KiB here): refused before parsing.
    r = post("/", content=json.dumps({"prompt": "x" * 70000}).encode())
    assert r.status_code == 413 and "max_body_bytes=65536" in r.json()["detail"]
    # A streaming client that hangs up early.
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as s:
        next(s.iter_lines())
    # And the server still answers correctly.
    ids = prompt_ids(cm.tokenizer, "hi", [], cm.template)
    r = post("/", json={"prompt": "hi", "temperature": 0})
    assert r.status_code == 200 and r.json()["response"] == greedy(cm, ids)


def logged_url(log_path) -> str | None:
    """The address in the server's "serving ... at http://host:port/" line, once it is logged."""
    found = re.search(r"serving .* at (http://[^/\s]+)/", Path(log_path).read_text())
    return found and found[1]


@contextlib.contextmanager
def served_by(cmd: list[str], cwd, env: dict, log_path, port: int | None = None):
    """(process, url) of a server started by `cmd` plus port=... (a free one unless given; with 0, the url is the
    one its log names), once it answers /health (with any status); terminated on leaving."""
    if port is None:
        with free_socket() as sock:
            port = sock.getsockname()[1]
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([*cmd, f"port={port}"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, Path(log_path).read_text()
                url = f"http://127.0.0.1:{port}" if port else logged_url(log_path)
                assert not (url or "").endswith(":0"), Path(log_path).read_text()  # no one can reach port 0
                if url:
                    try:
                        httpx.get(url + "/health", timeout=2)
                        break
                    except httpx.TransportError:
                        pass
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
            yield proc, url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_command_line_server_with_api_key(checkpoint, tmp_path):
    env = {**os.environ, "PTUNE_API_KEY": "s3cret"}
    with served_by([sys.executable, "-m", "ptune.serve", f"checkpoint={checkpoint}", "device=cpu",
                    f"max_new_tokens={MAX_NEW}", "log_level=warning"], REPO, env, tmp_path / "serve.log") as (proc, url):
        assert httpx.get(url + "/health", timeout=2).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        name = httpx.get(url + "/health", headers=good).json()["model"]
        for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None),
                                   ("GET", f"/v1/models/{name}", None),
                                   ("POST", "/", {"prompt": "hi"}),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
            r = httpx.request(method, url + path, json=body, timeout=60)
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"], (path, r.text)
            r = httpx.request(method, url + path, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60)
            assert r.status_code == 401
            r = httpx.request(method, url + path, json=body, headers=good, timeout=60)
            assert r.status_code == 200, (path, r.text)
        assert httpx.get(url + "/health", headers=good).json()["auth"] is True
        assert httpx.get(url + "/").status_code == 200  # the page itself is static and open
    # uvicorn shuts down cleanly on SIGTERM, then re-raises the signal so the exit status tells of it.
    assert proc.returncode in (0, -15), (tmp_path / "serve.log").read_text()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def together(url: str, *requests: tuple[str, dict]) -> list[httpx.Response]:
    """POST the requests at once, so that the server batches them."""
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    return asyncio.run(run())


def chat_request(text: str, **fields) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **fields}


def test_requests_past_the_models_positions_are_refused_before_batching(served_gpt2):
    url, cm = served_gpt2
    ids = lambda text: prompt_ids(cm.tokenizer, text, [], cm.template)  # noqa: E731
    # 500 prompt tokens + 20 asked for > 512 positions: a 400 naming the numbers, not an IndexError.
    r = httpx.post(url + "/v1/chat/completions", json=chat_request("x" * 500, max_tokens=20)[1], timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_tokens" and r.json()["error"]["code"] == "context_length_exceeded"
    assert "500 + 20 > the model's 512 positions" in r.json()["error"]["message"]
    assert "at most 12 new tokens fit" in r.json()["error"]["message"]
    r = httpx.post(url + "/", json={"prompt": "x" * 500, "max_length": 600, "temperature": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_length", r.text
    r = httpx.post(url + "/", json={"prompt": "x" * 512}, timeout=60)
    assert r.status_code == 400 and "no room for a reply" in r.json()["detail"], r.text
    # Without a length asked for, the reply takes what the positions leave.
    r = httpx.post(url + "/v1/chat/completions", json=chat_request("x" * 500)[1], timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 512, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy(cm, ids("x" * 500), 12)
    # Refused alone, it does not fail the valid request that arrived with it.
    bad, good = together(url, chat_request("x" * 500, max_tokens=20), chat_request("hi", max_tokens=5))
    assert bad.status_code == 400 and good.status_code == 200, (bad.text, good.text)
    assert good.json()["choices"][0]["message"]["content"] == greedy(cm, ids("hi"), 5)
    # Each fits alone, not together: every row of a batch steps until the longest reply ends, so the
    # 495-token prompt would pass 512 positions beside a 40-token reply. They are generated apart.
    before = httpx.get(url + "/health").json()["batches"]
    long, short = together(url, chat_request("x" * 495, max_tokens=5), chat_request("hi", max_tokens=40))
    assert long.status_code == 200 and short.status_code == 200, (long.text, short.text)
    assert httpx.get(url + "/health").json()["batches"] - before == 2  # not one that failed, then two
    assert short.json()["usage"]["completion_tokens"] == 40  # no early EOS: the rows would have collided
    assert long.json()["choices"][0]["message"]["content"] == greedy(cm, ids("x" * 495), 5)
    assert short.json()["choices"][0]["message"]["content"] == greedy(cm, ids("hi"), 40)
    assert httpx.get(url + "/health").json()["max_positions"] == 512


def test_a_failing_request_does_not_fail_the_others_in_its_batch(served_gpt2):
    from ptune.serve import Engine, Job

    _, cm = served_gpt2
    engine = Engine(cm, max_batch_size=8, batch_wait_ms=300)
    try:
        greedy_job = dict(do_sample=False, temperature=1.0, top_p=1.0)
        good_ids = prompt_ids(cm.tokenizer, "hi", [], cm.template)
        bad = engine.submit(Job([len(cm.tokenizer) + 100], 4, **greedy_job))  # no such token: an IndexError
        good = engine.submit(Job(good_ids, 4, **greedy_job))
        assert good.future.result(timeout=120).text == greedy(cm, good_ids, 4)
        with pytest.raises(IndexError):
            bad.future.result(timeout=120)
    finally:
        engine.close()


def test_an_empty_prompt_is_refused(served_gpt2):
    url, cm = served_gpt2
    assert cm.template == "plain"  # where an empty prompt is 0 tokens
    r = httpx.post(url + "/", json={"prompt": "", "temperature": 0}, timeout=60)
    assert r.status_code == 400 and "the prompt is empty; send some text" in r.json()["detail"], r.text
    assert r.json()["error"]["param"] == "prompt"
    empty, good = together(url, chat_request(""), chat_request("hi", max_tokens=5))
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages", empty.text
    assert "the prompt is empty; send some text" in empty.json()["error"]["message"]
    assert good.json()["choices"][0]["message"]["content"] == greedy(cm, prompt_ids(cm.tokenizer, "hi", [], "plain"), 5)


@pytest.mark.parametrize("path, body, field", [
    ("/", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("/", b'{"prompt": "hi", "history": [["q", "\\udfff"]]}', "history.0.1"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "system", "content": [{"type": "text", "text": "\\udc00"}]}, '
                             b'{"role": "user", "content": "hi"}]}', "messages.0.content"),
])
def test_a_lone_surrogate_is_refused_naming_the_field(served, path, body, field):
    url, _ = served
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith(f"{field}: ") and "unpaired surrogate" in r.json()["detail"]
    assert httpx.post(url + "/", json={"prompt": "hi", "temperature": 0}, timeout=60).status_code == 200


def test_temperature_and_top_p_take_numbers_only(served):
    url, _ = served
    for field, value in [("temperature", True), ("temperature", "0.5"), ("top_p", False), ("top_p", "1")]:
        for path, body in [("/", {"prompt": "hi"}), chat_request("hi")]:
            r = httpx.post(url + path, json={**body, field: value}, timeout=60)
            assert r.status_code == 422 and r.json()["error"]["param"] == field, (path, field, value, r.text)
    # Whole numbers are numbers.
    r = httpx.post(url + "/v1/chat/completions", json={**chat_request("hi")[1], "temperature": 1, "top_p": 1, "seed": 1},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_a_run_folder_serves_its_newest_checkpoint(checkpoint, tmp_path):
    cm = load_chat_model(compose("serve", f"checkpoint={checkpoint.parent}", "device=cpu"))
    assert cm.checkpoint == str(checkpoint) and cm.step == 2
    with pytest.raises(CheckpointError, match="found neither"):
        load_chat_model(compose("serve", f"checkpoint={tmp_path}", "device=cpu"))


@pytest.mark.slow
def test_serve_sh_reads_a_relative_run_folder_from_the_callers_folder(checkpoint, tmp_path):
    """`bash recipes/serve.sh ../run` from elsewhere than the repo: the caller's ../run, its newest checkpoint."""
    caller = checkpoint.parent.parent / "elsewhere"
    caller.mkdir(exist_ok=True)
    with served_by(["bash", str(REPO / "recipes" / "serve.sh"), f"../{checkpoint.parent.name}", "device=cpu",
                    "log_level=warning"], caller, {**os.environ, "PYTHON": sys.executable}, tmp_path / "serve.log") \
            as (_, url):
        health = httpx.get(url + "/health", timeout=2)
        assert health.status_code == 200
        assert (caller / health.json()["checkpoint"]).resolve() == checkpoint.resolve()


def test_stop_strings_end_the_reply_before_them_streamed_or_not(served):
    """OpenAI's `stop`: the reply ends before the first stop string, which is never sent, not even in part of a
    streamed chunk; finish_reason is "stop"."""
    url, _ = served
    path, body = chat_request("类型#裙*颜色#红色", temperature=0)
    whole = httpx.post(url + path, json=body, timeout=60).json()
    want = whole["choices"][0]["message"]["content"]
    assert len(want) >= 4, want  # the tiny model's greedy reply here runs to the token cap
    stop = want[2:4]
    cut = want[:want.find(stop)]

    def ask(stops, stream=False):
        if not stream:
            r = httpx.post(url + path, json={**body, "stop": stops}, timeout=60)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            return choice["message"]["content"], choice["finish_reason"], r.json()["usage"]["completion_tokens"]
        with httpx.stream("POST", url + path, json={**body, "stop": stops, "stream": True}, timeout=60) as r:
            chunks = sse(r.iter_lines())[:-1]
        pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        return "".join(pieces), chunks[-1]["choices"][0]["finish_reason"], chunks[-1]["usage"]["completion_tokens"]

    for stream in (False, True):
        text, reason, tokens = ask(stop, stream)
        assert (text, reason) == (cut, "stop"), (stream, want, stop)
        assert tokens < whole["usage"]["completion_tokens"]  # generation ended there
        assert ask(["never in it", stop], stream)[:2] == (cut, "stop")
        assert ask(["never in it"], stream)[:2] == (want, whole["choices"][0]["finish_reason"])
    for stops, message in [(["a", "b", "c", "d", "e"], "at most 4 stop strings, not 5"),
                           ("", "must not be empty"), ([7], "stop")]:
        r = httpx.post(url + path, json={**body, "stop": stops}, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["param"] == "stop", r.text
        assert message in r.json()["detail"], r.text


def gated_engine(cm, **kw):
    """An Engine whose batches wait for its `gate` before generating; `jobs` are those submitted."""
    from ptune.serve import Engine

    class Gated(Engine):
        def __init__(self, *args, **kwargs):
            self.jobs, self.gate, self.entered = [], threading.Event(), threading.Event()
            super().__init__(*args, **kwargs)

        def submit(self, job):
            self.jobs.append(job)
            return super().submit(job)

        def _generate(self, batch):
            self.entered.set()
            assert self.gate.wait(60)
            super()._generate(batch)

    return Gated(cm, **kw)


@pytest.fixture
def gated(served_gpt2):
    """A server on served_gpt2's model whose engine generates only once the test opens its gate."""
    from ptune.serve import create_app

    _, cm = served_gpt2
    cfg = compose("serve", "checkpoint=null", f"model.path={cm.base_path}", "model.template=plain", "device=cpu",
                  "max_new_tokens=64")
    engine = gated_engine(cm, batch_wait_ms=5)
    app = StatusLog(create_app(cm, cfg, engine))
    live = LiveServer(app)
    yield live.url, engine, app.statuses
    engine.gate.set()
    live.stop()


class StatusLog:
    """ASGI wrapper: (method, path, status) of each response the app sends, as an access log records it."""

    def __init__(self, app):
        self.app, self.statuses = app, []

    async def __call__(self, scope, receive, send):
        async def record(message):
            if message["type"] == "http.response.start":
                self.statuses.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, record)


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_stream_cut_short_by_its_batch_running_out_of_memory_says_so_and_the_rest_are_answered(gated, monkeypatch):
    """A batch runs out of memory (the allocator's error, injected) after its third token: the request not yet
    streamed is generated again alone and answered; the stream, which cannot start over, ends with an error event
    saying its batch ran out, not that it asked for too much."""
    import torch

    import ptune.serve

    from ptune.generate import StaticDecoder

    url, engine, _ = gated
    real, failed_decoders_at_retry, failed = ptune.serve.generate, [], []

    def generate(model, input_ids, *args, on_token=None, **kwargs):
        if len(input_ids) == 1 and failed:  # the retry: the failed batch's cache must be let go
            failed_decoders_at_retry.extend(o for o in gc.get_objects()
                                            if isinstance(o, StaticDecoder) and len(o.token) == 2)
        steps = []

        def counted(column):
            steps.append(None)
            if len(input_ids) > 1 and len(steps) > 3:
                failed.append(len(input_ids))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB.\nOf the allocated ...")
            on_token(column)

        return real(model, input_ids, *args, on_token=counted if on_token else None, **kwargs)

    monkeypatch.setattr(ptune.serve, "generate", generate)

    def stream() -> list:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json=chat_request("类型#裙", max_tokens=40, stream=True, temperature=0)[1]) as r:
            return sse(r.iter_lines())

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(httpx.post, url + "/", json={"prompt": "hi", "temperature": 0}, timeout=60)
        assert engine.entered.wait(30)  # the first batch holds that request alone, at the gate
        streamed = pool.submit(stream)
        plain = pool.submit(httpx.post, url + "/v1/chat/completions", timeout=60,
                            json=chat_request("类型#裤", max_tokens=40, temperature=0)[1])
        wait_for(lambda: len(engine.jobs) == 3)  # the other two wait for the next batch, together
        engine.gate.set()
        assert first.result().status_code == 200 and plain.result().status_code == 200, plain.result().text
        events = streamed.result()
    assert any(e["choices"][0]["delta"].get("content") for e in events if "choices" in e), events  # text went out
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and events[-1] == "[DONE]", events
    assert failed == [2] and failed_decoders_at_retry == []
    error = errors[0]
    assert error["code"] == "out_of_memory" and error["type"] == "server_error", events
    assert re.fullmatch(r"the reply was cut short: the batch it shared with 1 other request\(s\) ran out of device "
                        r"memory \(CUDA out of memory. Tried to allocate 5.00 GiB.\); send the request again",
                        error["message"]), error


@pytest.mark.parametrize("path, body", [("/", {"prompt": "hi", "temperature": 0}), chat_request("hi")])
def test_a_client_that_hangs_up_stops_its_generation(gated, path, body):
    url, engine, statuses = gated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + path, json={**body, "max_tokens": 60, "max_length": 60}, timeout=0.5)
    wait_for(lambda: engine.jobs and engine.jobs[0].cancelled)
    # Logged as the client's doing, not as a server error (a 500 would set off alerts on 5xx).
    wait_for(lambda: statuses)
    assert statuses == [("POST", path, 499)]
    engine.gate.set()
    wait_for(lambda: httpx.get(url + "/health").json()["cancelled"] == 1)
    assert httpx.get(url + "/health").json()["served"] == 0  # not generated to the end
    # The server still answers.
    r = httpx.post(url + "/v1/chat/completions", json=chat_request("hi", max_tokens=3)[1], timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def test_jobs_waiting_to_be_batched_count_against_max_queue(served_gpt2):
    from ptune.serve import Job, QueueFull

    _, cm = served_gpt2
    engine = gated_engine(cm, batch_wait_ms=300, max_queue=3)
    try:
        # A long prompt does not fit GPT-2's 512 positions beside a long reply, so the worker gathers these three,
        # runs the first and holds two back.
        greedy_job = dict(do_sample=False, temperature=1.0, top_p=1.0)
        engine.submit(Job([1, 2], 500, **greedy_job))
        wide = lambda: Job([1] * 400, 2, **greedy_job)  # noqa: E731
        for _ in range(2):
            engine.submit(wide())
        wait_for(lambda: engine.entered.is_set() and engine.queue.qsize() == 0)
        assert engine.pending() == 2
        engine.submit(wide())
        with pytest.raises(QueueFull, match="3 requests are waiting"):
            engine.submit(wide())
    finally:
        engine.gate.set()
        engine.close()


def test_openai_fields_that_would_change_the_reply_are_refused_unless_off(served):
    """logprobs, tools, response_format, penalties and the like are not done here: a value that asks for them is a
    422 naming the field, not a reply that silently ignores it; the values clients send by default are served."""
    url, _ = served
    path, body = chat_request("hi", max_tokens=2, temperature=0)
    off = {"logprobs": False, "top_logprobs": 0, "logit_bias": {}, "frequency_penalty": 0, "presence_penalty": 0.0,
           "tools": [], "tool_choice": "auto", "response_format": {"type": "text"}}
    r = httpx.post(url + path, json={**body, **off}, timeout=60)
    assert r.status_code == 200, r.text
    for field, value in [("logprobs", True), ("top_logprobs", 2), ("logit_bias", {"5": 100}),
                         ("frequency_penalty", 0.5), ("presence_penalty", -1),
                         ("response_format", {"type": "json_object"}),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
                         ("functions", [{"name": "f"}]), ("function_call", {"name": "f"})]:
        r = httpx.post(url + path, json={**body, field: value}, timeout=60)
        assert r.status_code == 422, (field, r.text)
        error = r.json()["error"]
        assert error["param"] == field and "not done by this server" in error["message"], r.text


def test_a_streamed_event_is_one_line_to_readers_that_split_at_unicode_line_breaks():
    """httpx's iter_lines splits as str.splitlines does: at U+2028, U+2029, U+0085 and the C0 separators too."""
    from ptune.serve import sse_event

    text = "一\u2028二\u2029三\x85四\x1c五\x1d六\x1e七\x0b八\x0c九\r十\n完"
    event = sse_event({"choices": [{"delta": {"content": text}}]})
    lines = event.splitlines()
    assert lines[0].startswith("data: ") and lines[1:] == [""] and event.endswith("\n\n")
    assert json.loads(lines[0][len("data: "):])["choices"][0]["delta"]["content"] == text
    assert "一" in lines[0]  # the text itself is not escaped


def test_requests_whose_clients_went_away_keep_no_place_in_the_queue(served_gpt2):
    from ptune.serve import Job

    _, cm = served_gpt2
    engine = gated_engine(cm, batch_wait_ms=0, max_batch_size=1, max_queue=2)
    try:
        job = lambda: Job([1, 2], 2, do_sample=False, temperature=1.0, top_p=1.0)  # noqa: E731
        running = engine.submit(job())
        wait_for(lambda: engine.entered.is_set())
        gone = [engine.submit(job()), engine.submit(job())]
        assert engine.pending() == 2
        for j in gone:
            j.cancelled = True  # what a handler does when its client hangs up
        assert engine.pending() == 0 and engine.queue.qsize() == 0  # dropped: hang-ups cannot grow the queue
        waiting = [engine.submit(job()), engine.submit(job())]  # max_queue=2 counts only these
        engine.gate.set()
        assert all(j.future.result(timeout=60).completion_tokens == 2 for j in [running, *waiting])
        assert all(j.future.cancelled() for j in gone)
    finally:
        engine.gate.set()
        engine.close()


def test_a_full_queue_answers_503_with_retry_after(gated):
    url, engine, _ = gated
    engine.max_queue = 0
    for path, body in [("/", {"prompt": "hi"}), chat_request("hi"), chat_request("hi", stream=True)]:
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
        assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize("path, body", [("/", {"prompt": "slow", "max_length": 40}), chat_request("slow", max_tokens=3)])
def test_a_prompt_being_tokenized_holds_up_no_other_request(served, monkeypatch, path, body):
    """Tokenizing a prompt near max_body_bytes takes a second or more; meanwhile the server keeps answering."""
    import ptune.serve

    url, _ = served
    real, entered, gate = ptune.serve.build_prompt, threading.Event(), threading.Event()

    def held(tokenizer, template, query, *rest):
        if query == "slow":  # stands in for a long one: tokenized only once the test opens the gate
            entered.set()
            assert gate.wait(60)
        return real(tokenizer, template, query, *rest)

    monkeypatch.setattr(ptune.serve, "build_prompt", held)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, url + path, json=body, timeout=60)
        try:
            assert entered.wait(30)
            # The event loop is free: it answers (and would go on streaming other replies) while the prompt is
            # being tokenized. Tokenized on the loop, this request waited for the gate and timed out.
            assert httpx.get(url + "/health", timeout=10).status_code == 200
        finally:
            gate.set()
        assert slow.result().status_code == 200, slow.result().text


def test_a_request_out_of_memory_even_alone_is_a_503_saying_what_it_asked_for(served, monkeypatch, caplog):
    """What the CUDA allocator raises, injected into any generation of 7 new tokens or more: the batch it shares
    is retried one request at a time, the other request is answered, and this one is told in one line, in
    every API and in a stream; the server log has one line, no traceback."""
    import torch

    import ptune.serve

    url, cm = served
    real = ptune.serve.generate

    def generate(*args, max_new_tokens, **kwargs):
        if max_new_tokens >= 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.\nOf the allocated ...")
        return real(*args, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(ptune.serve, "generate", generate)
    said = re.compile(r"^out of device memory generating a reply of up to 7 tokens to a prompt of \d+ tokens \(CUDA out "
                      r"of memory. Tried to allocate 9.00 GiB.\); ask for a shorter reply or send a shorter prompt$")
    caplog.set_level("WARNING", logger="ptune.serve")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        small = pool.submit(httpx.post, url + "/v1/chat/completions", json=chat_request("hi", max_tokens=3)[1],
                            timeout=60)
        large = pool.submit(httpx.post, url + "/v1/chat/completions", json=chat_request("hi", max_tokens=7)[1],
                            timeout=60)
        assert small.result().status_code == 200, small.result().text
        r = large.result()
    assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory", r.text
    assert said.match(r.json()["error"]["message"]) and r.json()["error"]["type"] == "server_error", r.text
    r = httpx.post(url + "/", json={"prompt": "hi", "max_length": 200}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory", r.text
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat_request("hi", max_tokens=7, stream=True)[1],
                      timeout=60) as r:
        events = sse(r.iter_lines())
    error = next(e["error"] for e in events if isinstance(e, dict) and "error" in e)
    assert error["code"] == "out_of_memory" and said.match(error["message"]), events
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3 and not any(r.exc_info for r in errors), caplog.text
    assert all(said.match(r.getMessage().replace("up to 12 tokens", "up to 7 tokens")) for r in errors), caplog.text
    assert not any("\n" in r.getMessage() for r in caplog.records), caplog.text  # the batch's warning too
    monkeypatch.undo()
    assert httpx.post(url + "/v1/chat/completions", json=chat_request("hi", max_tokens=7)[1],
                      timeout=60).status_code == 200


def test_an_empty_query_is_refused_under_a_chat_template(served):
    url, cm = served
    assert cm.template != "plain"  # where role tokens make an empty query more than 0 tokens
    r = httpx.post(url + "/", json={"prompt": "", "history": [["q", "a"]]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_prompt", r.text
    assert r.json()["error"]["param"] == "prompt"
    for content in ["", None, []]:
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": content}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "empty_prompt", (content, r.text)
        assert r.json()["error"]["param"] == "messages"


def test_null_stream_and_n_and_the_developer_role_are_accepted(served):
    url, cm = served
    messages = [{"role": "developer", "content": "简短"}, {"role": "user", "content": "材质#棉"}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "stream": None, "n": None,
                                                       "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    sys_ids = build_prompt(cm.tokenizer, cm.template, "材质#棉", [], "简短")  # a system turn, as OpenAI means it
    assert r.json()["usage"]["prompt_tokens"] == len(sys_ids)
    assert r.json()["choices"][0]["message"]["content"] == greedy(cm, sys_ids, 5)


def stream_events(url: str, body: dict) -> list:
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return sse(r.iter_lines())


def test_include_usage_sends_the_usage_in_a_chunk_of_its_own(served):
    """OpenAI's stream_options.include_usage: `"usage": null` on every chunk, then a chunk with no choices and
    the usage, then [DONE]."""
    url, cm = served
    path, body = chat_request("类型#裙*颜色#红色", temperature=0)
    whole = httpx.post(url + path, json=body, timeout=60).json()
    assert whole["usage"]["prompt_tokens"] == len(prompt_ids(cm.tokenizer, "类型#裙*颜色#红色", [], cm.template))
    events = stream_events(url, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    *content, finish, usage = events[:-1]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in [*content, finish])
    assert [c["choices"][0]["finish_reason"] for c in [*content, finish]] == \
        [None] * len(content) + [whole["choices"][0]["finish_reason"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == \
        whole["choices"][0]["message"]["content"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert usage["object"] == "chat.completion.chunk" and usage["id"] == finish["id"]
    # Without it (absent, false or null) no usage chunk; the usage rides on the finish_reason chunk, as it always
    # has here.
    for extra in [{}, {"stream_options": None}, {"stream_options": {}}, {"stream_options": {"include_usage": False}}]:
        chunks = stream_events(url, {**body, **extra})[:-1]
        assert all(len(c["choices"]) == 1 for c in chunks), extra
        assert chunks[-1]["usage"] == whole["usage"] and all("usage" not in c for c in chunks[:-1]), extra
    r = httpx.post(url + path, json={**body, "stream": True, "stream_options": {"include_usage": "yes"}}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "stream_options", r.text


def test_one_model_by_its_id(served):
    url, _ = served
    listed = httpx.get(url + "/v1/models").json()["data"][0]
    assert "/" in listed["id"]  # <run folder>/checkpoint-N
    for path in [listed["id"], listed["id"].replace("/", "%2F")]:  # OpenAI's client sends the latter
        r = httpx.get(f"{url}/v1/models/{path}")
        assert r.status_code == 200 and r.json() == listed, r.text
    r = httpx.get(url + "/v1/models/gpt-4o")
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
    assert "'gpt-4o'" in error["message"] and repr(listed["id"]) in error["message"]


def test_the_openai_client_reads_streams_usage_and_models(served):
    openai = pytest.importorskip("openai")
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    name = client.models.list().data[0].id
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    ask = dict(model=name, messages=[{"role": "user", "content": "类型#裙*颜色#红色"}], temperature=0)
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert all(c.choices for c in chunks) and chunks[-1].usage == whole.usage


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions"])
def test_a_body_that_is_not_utf8_is_refused_saying_where(served, path):
    url, _ = served
    text = json.dumps({"prompt": "café"} if path == "/" else chat_request("café")[1], ensure_ascii=False)
    for body, byte, offset in [(text.encode("latin-1"), 0xe9, text.index("é")),
                               (text.encode("utf-16"), 0xff, 0),  # JSON between systems is UTF-8 only
                               ("类".encode()[:2], 0xe7, 0)]:  # cut inside a character
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 422, r.text  # as for a body that is not JSON
        error = r.json()["error"]
        assert f"the body is not UTF-8 (byte 0x{byte:02x} at offset {offset})" in error["message"], r.text
        assert error["code"] == "invalid_encoding" and r.json()["detail"] == error["message"]
    assert httpx.post(url + path, content=text.encode(), timeout=60).status_code == 200


def depth_json_refuses() -> int:
    """A nesting depth this interpreter's JSON parser gives up on in any thread (it varies from one Python release
    to the next: 1000 frames less those in use on 3.11): the least that fails in a thread of its own, whose stack
    is as shallow as a server thread's can be, and a tenth more."""
    def fails(depth: int) -> bool:
        try:
            json.loads("[" * depth + "]" * depth)
        except RecursionError:
            return True
        return False

    def least_failing(found: list[int]) -> None:
        fits, fails_at = 1, 1000
        while not fails(fails_at):
            fits, fails_at = fails_at, fails_at * 2
        while fails_at - fits > 1:
            middle = (fits + fails_at) // 2
            fits, fails_at = (fits, middle) if fails(middle) else (middle, fails_at)
        found.append(fails_at)

    found: list[int] = []
    probe = threading.Thread(target=least_failing, args=(found,))
    probe.start()
    probe.join()
    return found[0] + found[0] // 10


@pytest.mark.parametrize("path, field", [("/", "max_length"), ("/v1/chat/completions", "max_tokens")])
def test_a_number_too_long_to_parse_is_refused_saying_so(served, path, field):
    url, _ = served
    fields = {"prompt": "hi"} if path == "/" else chat_request("hi")[1]
    body = json.dumps(fields)[:-1] + f', "{field}": 1' + "0" * (sys.get_int_max_str_digits() + 10) + "}"
    r = httpx.post(url + path, content=body.encode(), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "number_too_long", r.text
    assert f"a number of more than {sys.get_int_max_str_digits()} digits" in error["message"]


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions"])
def test_a_body_nested_too_deeply_to_parse_is_refused_saying_so(served, path):
    url, cm = served
    fields = {"prompt": "hi"} if path == "/" else chat_request("hi")[1]
    deep = depth_json_refuses()
    bodies = ["[" * deep + "]" * deep,  # the whole body, and a field the request does not read
              json.dumps(fields)[:-1] + ', "extra": ' + "[" * deep + "]" * deep + "}",
              json.dumps(fields)[:-1] + ', "extra": ' + '{"":' * deep + "1" + "}" * deep + "}"]
    bodies = [b for b in bodies if len(b) <= 65536]  # the fixture's max_body_bytes: past it, a 413
    assert bodies, f"no body nested {deep} levels fits in 64 KiB"
    for body in bodies:
        r = httpx.post(url + path, content=body.encode(), timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "nests arrays or objects too deeply" in error["message"], r.text
        assert error["code"] == "json_too_deep" and r.json()["detail"] == error["message"]
    # A body nested a few levels, as every request here is, is served.
    r = httpx.post(url + path, json={**fields, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_system_message_too_long_on_its_own_is_refused_as_such(served):
    url, _ = served
    long = "x" * 500  # past max_prompt_tokens (200 here) on its own

    def refusal(path, body) -> dict:
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        return r.json()["error"]

    # However short the message and whatever the history, no prompt fits: the system message is what to shorten.
    error = refusal("/v1/chat/completions", {"messages": [{"role": "system", "content": long},
                                                          *[{"role": r, "content": "x"} for r in ("user", "assistant")],
                                                          {"role": "user", "content": "hi"}]})
    assert error["system_too_long"] is True and error["turns_to_leave_out"] is None, error
    assert "the system message alone makes a prompt of" in error["message"] and "at most 200" in error["message"]
    assert "shorten the system message" in error["message"]
    # A message too long beside a short system message: the prompt is what is too long, as before.
    error = refusal("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                                          {"role": "user", "content": long}]})
    assert error["system_too_long"] is False and "system message" not in error["message"], error
    assert "at most 200" in error["message"]
    error = refusal("/", {"prompt": long})
    assert error["system_too_long"] is False, error


def test_a_conversation_too_long_is_refused_saying_how_many_turns_to_leave_out(served):
    url, cm = served
    history = [(f"q{i} " + "x" * 30, f"a{i} " + "y" * 30) for i in range(6)]
    length = lambda history: len(prompt_ids(cm.tokenizer, "hi", history, cm.template))  # noqa: E731
    fewest = next(n for n in range(len(history) + 1) if length(history[n:]) <= 200)  # max_prompt_tokens=200 here
    assert 1 < fewest < len(history)
    messages = [{"role": r, "content": t} for turn in history for r, t in zip(("user", "assistant"), turn)]
    for path, body in [("/v1/chat/completions", {"messages": [*messages, {"role": "user", "content": "hi"}]}),
                       ("/", {"prompt": "hi", "history": [list(turn) for turn in history]})]:
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["turns_to_leave_out"] == fewest, error
        assert error["prompt_tokens"] == length(history) and error["prompt_limit"] == 200, error
    # That many left out, the request is taken; one fewer, it is not.
    r = httpx.post(url + "/", json={"prompt": "hi", "history": history[fewest:], "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/", json={"prompt": "hi", "history": history[fewest - 1:]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["turns_to_leave_out"] == 1, r.text
    # A message too long on its own: no number of turns would do.
    r = httpx.post(url + "/", json={"prompt": "x" * 500, "history": history[:1]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["turns_to_leave_out"] is None, r.text


def test_a_reply_that_does_not_fit_beside_the_conversation_says_how_many_turns_to_leave_out(served_gpt2):
    """The prompt fits GPT-2's 512 positions, but not with the max_tokens asked for: the refusal says how many oldest
    turns to leave out for the reply to fit too (the chat page acts on it), not only that it does not fit."""
    url, cm = served_gpt2
    length = lambda history: len(prompt_ids(cm.tokenizer, "hi", history, cm.template))  # noqa: E731
    history = []
    while length(history) <= 512 - 64:
        history.append((f"q{len(history)} " + "x" * 20, f"a{len(history)} " + "y" * 20))
    assert length(history) < 512  # the prompt alone fits
    fewest = next(n for n in range(len(history) + 1) if length(history[n:]) + 64 <= 512)
    assert fewest >= 1
    messages = [{"role": r, "content": t} for turn in history for r, t in zip(("user", "assistant"), turn)]
    body = {"messages": [*messages, {"role": "user", "content": "hi"}], "max_tokens": 64, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["turns_to_leave_out"]) == ("context_length_exceeded", "max_tokens",
                                                                            fewest), error
    assert error["prompt_tokens"] == length(history) and error["prompt_limit"] == 512 - 64, error
    body["messages"] = body["messages"][2 * fewest:]
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_a_prompt_of_spaces_and_newlines_alone_is_refused(served):
    url, _ = served
    for text in [" ", "\n\n", " \t\r\n\u3000"]:
        r = httpx.post(url + "/", json={"prompt": text, "history": [["q", "a"]]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "empty_prompt", (text, r.text)
        assert r.json()["error"]["param"] == "prompt" and "the prompt is empty" in r.json()["detail"]
        r = httpx.post(url + "/v1/chat/completions", json=chat_request(text)[1], timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "empty_prompt", (text, r.text)
        assert r.json()["error"]["param"] == "messages"
    r = httpx.post(url + "/v1/chat/completions", json=chat_request(" 颜色#白色\n", max_tokens=2)[1], timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("override, fragments", [
    ("api_key=1e5", ["api_key is a number, not text", "quote it", "100000.0"]),
    ("api_key=1_000", ["api_key is a number", "quote it"]),
    ("api_key=true", ["api_key is true/false", "quote it"]),
    ('api_key="clé"', ["api_key holds characters outside ASCII", "use an ASCII key"]),
    # HTTP strips a header's value at both ends, so a request could never send these whole.
    ('api_key=" s3cret"', ["api_key begins with whitespace (' ')", "no request can match it"]),
    ('api_key="s3cret\n"', ["api_key ends with whitespace ('\\n')", "line ending"]),
    ('api_key="two\nlines"', ["api_key holds a control character ('\\n')", "cannot carry"]),
    # `api_key=$KEY` with KEY unset: the key meant to guard the server would silently be none.
    ("api_key=", ["api_key is empty", "api_key=null"]),
    ('api_key=""', ["api_key is empty"]),
])
def test_an_api_key_requests_could_not_send_is_refused_at_startup(checkpoint, override, fragments):
    from ptune.errors import ConfigError
    from ptune.settings import serve as check_settings

    with pytest.raises(ConfigError) as e:
        check_settings(compose("serve", f"checkpoint={checkpoint}", override))
    assert all(f in str(e.value) for f in fragments), str(e.value)
    check_settings(compose("serve", f"checkpoint={checkpoint}", 'api_key="1e5"'))  # quoted, it stays text
    check_settings(compose("serve", f"checkpoint={checkpoint}", 'api_key="a b\tc"'))  # a header carries these inside


def test_a_key_from_the_environment_that_requests_could_not_send_is_refused_at_startup(checkpoint, monkeypatch):
    from ptune.errors import ConfigError
    from ptune.settings import api_key_of, serve as check_settings

    monkeypatch.setenv("PTUNE_API_KEY", "密钥")
    with pytest.raises(ConfigError, match="PTUNE_API_KEY holds characters outside ASCII"):
        check_settings(compose("serve", f"checkpoint={checkpoint}"))
    monkeypatch.setenv("PTUNE_API_KEY", "s3cret\r")  # `$(cat keyfile)` keeps the \r of a file's \r\n
    with pytest.raises(ConfigError, match=r"PTUNE_API_KEY ends with whitespace \('\\r'\)"):
        check_settings(compose("serve", f"checkpoint={checkpoint}"))
    monkeypatch.setenv("PTUNE_API_KEY", "")  # an empty variable is an unset one, as for most programs
    check_settings(compose("serve", f"checkpoint={checkpoint}"))
    assert api_key_of(compose("serve", f"checkpoint={checkpoint}")) is None


@pytest.mark.slow
def test_port_0_logs_the_port_the_os_picked(checkpoint, tmp_path):
    with served_by([sys.executable, "-m", "ptune.serve", f"checkpoint={checkpoint}", "device=cpu",
                    f"max_new_tokens={MAX_NEW}", "log_level=warning"], REPO, os.environ, tmp_path / "serve.log",
                   port=0) as (_, url):
        assert httpx.get(url + "/health", timeout=2).status_code == 200


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path):
    """The bind comes first: the error names host and port, and no model is read (model.path does not exist)."""
    with free_socket() as taken:
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "ptune.serve", "checkpoint=null",
                               f"model.path={tmp_path / 'no-model-here'}", f"port={port}"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"error: host=127.0.0.1 port={port}: cannot listen there (Address already in use)" in done.stderr
    assert "Traceback" not in done.stderr and "no-model-here" not in done.stderr


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


def serve_cmd(checkpoint, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ptune.serve", f"checkpoint={checkpoint}", "device=cpu", f"max_new_tokens={MAX_NEW}",
            "log_level=warning", *overrides]


@pytest.mark.slow
@needs_ipv6
def test_localhost_is_served_on_both_loopback_addresses(checkpoint, tmp_path):
    """Clients resolve localhost to 127.0.0.1 or ::1, and some try only the first address they get."""
    with served_by(serve_cmd(checkpoint, "host=localhost"), REPO, os.environ, tmp_path / "serve.log", port=0) \
            as (_, url):
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://localhost:{port}"
        for address in ("127.0.0.1", "[::1]"):
            assert httpx.get(f"http://{address}:{port}/health", timeout=5).status_code == 200, address


@pytest.mark.slow
@needs_ipv6
def test_an_ipv6_host_is_bracketed_in_the_startup_line(checkpoint, tmp_path):
    with served_by(serve_cmd(checkpoint, "host=::1"), REPO, os.environ, tmp_path / "serve.log", port=0) as (_, url):
        assert re.fullmatch(r"http://\[::1\]:\d+", url), url
        assert httpx.get(url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("host, why", [("example.invalid", ""), ("192.0.2.1", "Cannot assign requested address")])
def test_a_host_that_is_no_address_of_this_machine_is_refused_naming_the_host_not_the_port(host, why):
    from ptune.errors import ConfigError
    from ptune.serve import listen_sockets

    with pytest.raises(ConfigError, match=rf"^host={host}: cannot listen there \(.*{why}.*\); expected an address of "
                                          r"this machine \(127.0.0.1, ::1, localhost, or 0.0.0.0 for every interface\)$"):
        listen_sockets(host, 0)


@needs_ipv6
def test_localhost_with_its_port_taken_on_ipv6_is_refused_naming_that_address():
    """Clients that resolve localhost to ::1 would reach the other server there, so that is no place to serve."""
    from ptune.errors import ConfigError
    from ptune.serve import listen_sockets

    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"host=localhost port={port}: cannot listen on ::1 \(Address already"):
            listen_sockets("localhost", port)
    # With port=0 the system's pick for 127.0.0.1 must be free on ::1 too.
    sockets = listen_sockets("localhost", 0)
    try:
        assert sorted(s.getsockname()[0] for s in sockets) == ["127.0.0.1", "::1"]
        assert len({s.getsockname()[1] for s in sockets}) == 1
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                            ("LOCALHOST", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.5", False), ("myhost.example", False)])
def test_only_hosts_outside_loopback_count_as_exposed(host, loopback):
    """The warning about serving without a key is for addresses others can reach, all of 127/8 being local."""
    from ptune.serve import is_loopback

    assert is_loopback(host) is loopback


def test_a_body_that_stops_arriving_is_refused_with_408_and_the_server_goes_on(checkpoint, served):
    """A client that sends headers and part of its body, then nothing, gets 408 once body_timeout_s passes and
    its connection closed; it does not hold the connection for good, and other requests are served meanwhile."""
    from ptune.serve import create_app

    _, cm = served
    cfg = compose("serve", f"checkpoint={checkpoint}", "device=cpu", f"max_new_tokens={MAX_NEW}", "body_timeout_s=1")
    live = LiveServer(create_app(cm, cfg))
    try:
        port = int(live.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 200\r\n\r\n{\"messages\": [")
            started = time.monotonic()
            assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200  # not held up by the stalled one
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                answer += chunk
            waited = time.monotonic() - started
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        error = json.loads(body)["error"]
        assert error["code"] == "body_timeout" and "body_timeout_s=1 seconds" in error["message"], error
        assert 0.5 < waited < 20, waited
    finally:
        live.stop()


def test_cors_origins_answers_preflights_and_marks_replies_for_the_listed_origins_only(checkpoint, served):
    """With cors_origins the server answers a browser's preflight and marks its replies, refusals of the body
    check included, for the listed origins, and for no other; without it (the default) for none."""
    from ptune.serve import create_app

    url, cm = served
    page = "http://localhost:3000"
    cfg = compose("serve", f"checkpoint={checkpoint}", "device=cpu", f"max_new_tokens={MAX_NEW}",
                  "max_body_bytes=1024", "api_key=k", f"cors_origins=[\"{page}\"]")
    live = LiveServer(create_app(cm, cfg))
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    try:
        r = httpx.options(f"{live.url}/v1/chat/completions", headers={"Origin": page, **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page, r.headers
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60,
                       headers={"Origin": page, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = httpx.post(f"{live.url}/v1/chat/completions", content=b"x" * 2048, timeout=60,
                       headers={"Origin": page, "Authorization": "Bearer k"})
        assert r.status_code == 413 and r.headers["access-control-allow-origin"] == page
        r = httpx.options(f"{live.url}/v1/chat/completions", headers={"Origin": "http://elsewhere", **preflight})
        assert "access-control-allow-origin" not in r.headers
    finally:
        live.stop()
    r = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": page, **preflight})
    assert "access-control-allow-origin" not in r.headers


def long_reply_model(tiny_model_dir, out: Path) -> Path:
    """The tiny llama with room for a reply of 16000 tokens (rotary positions: the same weights take any length),
    which takes minutes to generate whole on a CPU; its greedy replies never reach EOS."""
    shutil.copytree(tiny_model_dir("llama"), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    return out


STOP_WITHIN_S = 10  # Docker's wait between SIGTERM and SIGKILL; systemd waits 90 s


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_stopping_the_server_ends_the_replies_in_progress(tiny_model_dir, tmp_path, signum, status):
    """SIGTERM (a service manager's stop) or Ctrl-C while a long reply streams and another request waits: both
    end at once, each client told why, and the process exits with its usual status within seconds, not once the
    reply has been generated whole."""
    model = long_reply_model(tiny_model_dir, tmp_path / "model")
    cmd = [sys.executable, "-m", "ptune.serve", "checkpoint=null", f"model.path={model}", "device=cpu",
           "max_new_tokens=16000", "log_level=warning"]
    with served_by(cmd, REPO, os.environ, tmp_path / "serve.log") as (proc, url):
        lines, arrived = [], []

        def stream():
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 16000}
            with contextlib.suppress(httpx.TransportError):  # the unfixed server is killed mid-stream
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            arrived.append(time.monotonic())

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            wait_for(lambda: len(lines) > 200, 60)
            # The reply generating, another one waits for the worker.
            waiting = pool.submit(httpx.post, url + "/v1/chat/completions", timeout=120,
                                  json=chat_request("hi", max_tokens=16000)[1])
            wait_for(lambda: httpx.get(url + "/health", timeout=5).json()["queued"] == 1)
            n, started, now = len(arrived), arrived[0], arrived[-1]
            whole_s = 16000 * (now - started) / (n - 1)  # at least: each token attends over more positions
            assert whole_s > 3 * STOP_WITHIN_S, f"the reply is generated whole in {whole_s:.0f} s: too soon to tell"
            signalled = time.monotonic()
            proc.send_signal(signum)
            try:
                proc.wait(timeout=STOP_WITHIN_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {STOP_WITHIN_S} s after {signum.name}, with {len(lines)} chunks streamed "
                            f"of a reply generated whole in {whole_s:.0f} s or more")
            stopped_s = time.monotonic() - signalled
            reader.join(10)
            answer = waiting.result(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            pool.shutdown(wait=False, cancel_futures=True)
    assert proc.returncode == status, (tmp_path / "serve.log").read_text()
    assert stopped_s < STOP_WITHIN_S and "Traceback" not in (tmp_path / "serve.log").read_text()
    # The stream ended with the reason, then [DONE], as every stream here ends.
    events = sse(lines)
    assert events[-1] == "[DONE]", lines[-3:]
    error = events[-2]["error"]
    assert error["code"] == "server_shutting_down" and "cut short" in error["message"], error
    assert len(events) < 16000
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "server_shutting_down", answer.text


@pytest.mark.slow
def test_a_stopping_server_waits_shutdown_timeout_s_at_most_for_a_connection(checkpoint, tmp_path):
    """A request whose body stops arriving would hold a stop for body_timeout_s; after shutdown_timeout_s it is cut
    off, its client told why, and the process exits with SIGTERM's status and no traceback in its log."""
    cmd = serve_cmd(checkpoint, "body_timeout_s=60", "shutdown_timeout_s=1")
    with served_by(cmd, REPO, os.environ, tmp_path / "serve.log") as (proc, url):
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 200\r\n\r\n{\"messages\": [")
                # Sent before this request, so read by the server's one event loop before it answers this one.
                assert httpx.get(url + "/health", timeout=10).status_code == 200
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_WITHIN_S)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"still running {STOP_WITHIN_S} s after SIGTERM, held by a body still arriving")
                stopped_s = time.monotonic() - signalled
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = (tmp_path / "serve.log").read_text()
    assert proc.returncode == -signal.SIGTERM and stopped_s < STOP_WITHIN_S and "Traceback" not in log, log
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and json.loads(body)["error"]["code"] == "server_shutting_down", answer
    assert "cut off: the server is stopping and shutdown_timeout_s ran out" in log, log


def test_a_cors_preflight_may_ask_for_any_request_header(checkpoint, served):
    """OpenAI's JS SDK sends x-stainless-* headers on every request; a preflight for them must pass from a listed
    origin (and only from one)."""
    from ptune.serve import create_app

    _, cm = served
    page = "http://localhost:3000"
    cfg = compose("serve", f"checkpoint={checkpoint}", "device=cpu", f"max_new_tokens={MAX_NEW}", "api_key=k",
                  f"cors_origins=[\"{page}\"]")
    live = LiveServer(create_app(cm, cfg))
    asked = ("authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-arch,x-stainless-runtime,"
             "x-stainless-package-version,x-stainless-retry-count")
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked}
    try:
        r = httpx.options(f"{live.url}/v1/chat/completions", headers={"Origin": page, **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page, r.text
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert set(asked.split(",")) <= allowed, allowed
        r = httpx.post(f"{live.url}/v1/chat/completions", json=chat_request("hi", max_tokens=2)[1], timeout=60,
                       headers={"Origin": page, "Authorization": "Bearer k", "X-Stainless-OS": "Linux"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page, r.text
        r = httpx.options(f"{live.url}/v1/chat/completions", headers={"Origin": "http://elsewhere", **preflight})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    finally:
        live.stop()


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions"])
def test_without_the_api_key_any_body_gets_401(checkpoint, served, path):
    """The key is checked first: a client without it gets 401 whatever it sends, not a refusal telling how its
    body was read (too large, not UTF-8, not JSON, nested too deeply, invalid fields)."""
    from ptune.serve import create_app

    _, cm = served
    cfg = compose("serve", f"checkpoint={checkpoint}", "device=cpu", f"max_new_tokens={MAX_NEW}", "api_key=k",
                  "max_body_bytes=65536")
    live = LiveServer(create_app(cm, cfg))
    good = json.dumps({"prompt": "hi"} if path == "/" else chat_request("hi")[1]).encode()
    try:
        for body in [b'{"prompt": "hi",', '{"prompt": "café"}'.encode("latin-1"), b"[" * 5000 + b"]" * 5000,
                     b'{"prompt": 5, "messages": 5}', b"x" * 70000, good]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}]:
                r = httpx.post(live.url + path, content=body, headers=headers, timeout=60)
                assert r.status_code == 401, (body[:40], headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        # With the key, the body is read and refused as before.
        r = httpx.post(live.url + path, content=b'{"prompt": "hi",', headers={"Authorization": "Bearer k"}, timeout=60)
        assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"], r.text
        r = httpx.post(live.url + path, content=good, headers={"Authorization": "Bearer k"}, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(live.url + "/").status_code == 200  # the chat page needs no key
    finally:
        live.stop()


@pytest.mark.parametrize("field, value, message", [
    ("stop", [1], "stop: expected a string or a list of up to 4 strings; got a list holding a number"),
    ("stop", {"a": 1}, "stop: expected a string or a list of up to 4 strings; got an object"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     'messages.0.content: only text is supported (a string, or a list of {"type": "text", "text": ...} parts); '
     "got a part of type image_url"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}],
     'messages.0.content: only text is supported (a string, or a list of {"type": "text", "text": ...} parts); '
     "got a text part whose text is a number"),
    ("messages", [{"role": "user", "content": 5}],
     'messages.0.content: only text is supported (a string, or a list of {"type": "text", "text": ...} parts); '
     "got a number"),
])
def test_a_field_of_several_shapes_is_refused_in_one_plain_message(served, field, value, message):
    """`stop` and a message's `content` take one of several shapes; a wrong one gets one line saying what the field
    takes, not pydantic's failure for each shape under its internal type name."""
    url, _ = served
    r = httpx.post(url + "/v1/chat/completions", json={**chat_request("hi")[1], field: value}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] == message and r.json()["error"]["param"] == field, r.text
