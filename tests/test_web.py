"""The chat page in a real headless Chromium: it shows the checkpoint, streams replies and keeps the history,
stays usable through long replies, a narrow window, errors, a busy server, a conversation grown too long, an
empty reply and a reload.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped without them.
Screenshots are kept at outputs/test-artifacts/web_chat.png (and web_chat_narrow.png, a phone's width).
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import LiveServer
from ptune.chat import load_chat_model
from ptune.data import left_pad, prompt_ids
from ptune.evaluate import predict
from ptune.generate import generate
from ptune.serve import Engine, create_app

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = REPO / "outputs" / "test-artifacts" / "web_chat.png"
MAX_NEW = 12

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium and chromium-driver to run the page test",
                allow_module_level=True)
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not Path(DRIVER).exists():
    pytest.skip("chromedriver not found: install Debian's chromium-driver", allow_module_level=True)
pytest.importorskip("selenium", reason="the page test drives Chromium with selenium (pip install selenium)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def served(trained_checkpoint):
    import socket

    import uvicorn
    from hydra import compose, initialize_config_dir

    from ptune.serve import create_app

    ckpt = trained_checkpoint
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"checkpoint={ckpt}", "device=cpu", f"max_new_tokens={MAX_NEW}"])
    cm = load_chat_model(cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(cm, cfg), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield "http://127.0.0.1:%d" % sock.getsockname()[1], cm
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # The network log: what the page really sent (see `posted`).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def greedy(cm, prompt: list[int], extra_eos: tuple[int, ...] = ()) -> str:
    gen = OmegaConf.create({"max_new_tokens": MAX_NEW, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "compile_step": False,
                            "seed": 0, "extra_eos_token_ids": list(extra_eos)})
    return predict(cm.model, cm.tokenizer, [prompt], gen, 1, cm.device, progress=False)[0][0]


def first_token(cm, prompt: list[int]) -> int:
    """The greedy reply's first token."""
    enc = left_pad([prompt], cm.pad_token_id)
    return generate(cm.model, enc["input_ids"], enc["attention_mask"], max_new_tokens=1,
                    eos_token_ids=cm.eos_token_ids, pad_token_id=cm.pad_token_id).item()


def posted_requests(browser) -> list[dict]:
    """Each chat request the page sent since the last call, from Chromium's network log."""
    sent = []
    for entry in browser.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event["method"] == "Network.requestWillBeSent":
            request = event["params"]["request"]
            if request["url"].endswith("/v1/chat/completions"):
                sent.append(json.loads(request["postData"]))
    return sent


def posted(browser) -> list[list[dict]]:
    """The messages of each chat request the page sent since the last call."""
    return [request["messages"] for request in posted_requests(browser)]


def turns(*texts: str) -> list[dict]:
    """OpenAI messages: a question, its answer, the next question..."""
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def send_and_wait(browser, wait: WebDriverWait, box, text: str):
    """Types `text` into the input, sends it with Enter and returns the reply bubble once it is done."""
    done = '.msg.assistant[data-done="true"]'  # (replies restored after a reload carry no data-done)
    n = len(browser.find_elements(By.CSS_SELECTOR, done))
    box.send_keys(text, Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == n + 1)
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def open_greedy(browser, url: str, cm) -> WebDriverWait:
    """The page, loaded, with temperature 0 in its settings (greedy, to compare with evaluate's output)."""
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: str(cm.checkpoint) in d.find_element(By.ID, "model").text)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    return wait


def test_page_streams_replies_and_keeps_history(served, browser):
    url, cm = served
    wait = open_greedy(browser, url, cm)

    def say(text: str, n: int):
        box = browser.find_element(By.ID, "input")
        box.send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')) == n)
        return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n - 1]

    first = say("类型#裙*颜色#红色", 1)
    assert "error" not in first.get_attribute("class"), first.text
    assert int(first.get_attribute("data-chunks")) > 1  # the reply arrived as several streamed pieces
    # textContent, not .text: the latter trims and folds whitespace as a person would see it.
    reply1 = first.get_attribute("textContent")
    assert reply1 == greedy(cm, prompt_ids(cm.tokenizer, "类型#裙*颜色#红色", [], cm.template))

    second = say("材质#棉", 2)
    # The page sent the first turn along: the second reply is the one for that history.
    want = greedy(cm, prompt_ids(cm.tokenizer, "材质#棉", [("类型#裙*颜色#红色", reply1)], cm.template))
    assert second.get_attribute("textContent") == want
    asked = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")]
    assert asked == ["类型#裙*颜色#红色", "材质#棉"]

    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACT))
    print(f"screenshot of the chat page: {ARTIFACT}")

    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


class SlowEngine(Engine):
    """The real engine with a pause after each streamed piece: the tiny model answers in milliseconds, too fast
    to scroll, stop or lose the server in the middle of a reply."""

    delay = 0.03

    def __init__(self, *args, **kwargs):
        # A batch generates only while `gate` is open (it is, unless a test closes it); `entered`: one waits there.
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        super().__init__(*args, **kwargs)

    def _generate(self, batch):
        self.entered.set()
        self.gate.wait()
        for job in batch:
            if job.on_text:
                job.on_text = lambda text, emit=job.on_text: (time.sleep(self.delay), emit(text))
        super()._generate(batch)


@pytest.fixture
def slow_server(trained_checkpoint):
    """make(*overrides) -> a LiveServer over a SlowEngine; stopped at the end of the test."""
    from hydra import compose, initialize_config_dir

    servers = []

    def make(*overrides: str) -> LiveServer:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("serve", overrides=[f"checkpoint={trained_checkpoint}", "device=cpu", "max_new_tokens=200",
                                              *overrides])
        cm = load_chat_model(cfg)
        engine = SlowEngine(cm, cfg.max_batch_size, cfg.batch_wait_ms, cfg.max_queue, cfg.seed)  # as create_app's
        servers.append(LiveServer(create_app(cm, cfg, engine)))
        servers[-1].engine = engine
        return servers[-1]

    yield make
    for server in servers:
        if server.thread.is_alive():
            server.stop()


def health(url: str, key: str | None = None) -> dict:
    request = urllib.request.Request(url + "/health", headers={"Authorization": f"Bearer {key}"} if key else {})
    return json.loads(urllib.request.urlopen(request).read())


def chunks_of(el) -> int:
    return int(el.get_attribute("data-chunks") or 0)


def test_long_replies_keep_the_input_in_view_and_scrolling_up_stops_following(slow_server, browser):
    server = slow_server()
    browser.set_window_size(400, 640)  # a phone's width
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda d: "checkpoint" in d.find_element(By.ID, "model").text)
    box = browser.find_element(By.ID, "input")
    box.send_keys("a", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "b")  # Shift+Enter: a new line, nothing sent
    assert box.get_attribute("value") == "a\nb" and browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    box.clear()
    pane = "document.getElementById('messages')"
    gap = f"const m = {pane}; return m.scrollHeight - m.scrollTop - m.clientHeight"

    def reply(n: int):
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == n)
        return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n - 1]

    for n, text in enumerate(["类型#裙*颜色#红色", "材质#棉"], 1):
        box.send_keys(text, Keys.ENTER, Keys.ENTER, Keys.ENTER)  # Enter held down: one message all the same
        wait.until(lambda d: reply(n).get_attribute("data-done") == "true")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    # However long the conversation, the input, its buttons and the checkpoint stay on the screen.
    for css in ("#composer", "#send", "#stop", "#clear", "header"):
        inside = browser.execute_script("const r = document.querySelector(arguments[0]).getBoundingClientRect(); "
                                        "return r.top >= 0 && r.bottom <= innerHeight && r.right <= innerWidth", css)
        assert inside, css
    browser.save_screenshot(str(ARTIFACT.with_name("web_chat_narrow.png")))
    overflows = browser.execute_script(f"return {pane}.scrollHeight > {pane}.clientHeight")
    assert overflows, "the replies do not fill the pane"

    box.send_keys("类型#上衣", Keys.ENTER)
    third = reply(3)
    wait.until(lambda d: chunks_of(third) >= 5)
    assert browser.execute_script(gap) < 30  # at the bottom: the view follows the reply
    browser.execute_script(f"{pane}.scrollTop = 0")  # the user scrolls up to read
    seen = chunks_of(third)
    wait.until(lambda d: chunks_of(third) >= seen + 10 or third.get_attribute("data-done") == "true")
    assert chunks_of(third) >= seen + 10, "the reply ended before the test could watch the scroll"
    assert browser.execute_script(f"return {pane}.scrollTop") == 0  # ... and is left there
    browser.execute_script(f"{pane}.scrollTop = {pane}.scrollHeight")  # back at the bottom: followed again
    seen = chunks_of(third)
    wait.until(lambda d: chunks_of(third) >= seen + 5 or third.get_attribute("data-done") == "true")
    assert browser.execute_script(gap) < 30
    wait.until(lambda d: third.get_attribute("data-done") == "true")

    # Stop ends the server's generation too, and the stopped turn is marked as left out of the history.
    cancelled = health(server.url)["cancelled"]
    box.send_keys("材质#牛仔布", Keys.ENTER)
    fourth = reply(4)
    wait.until(lambda d: chunks_of(fourth) >= 3)
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: fourth.get_attribute("data-done") == "true")
    assert "stopped" in browser.find_element(By.ID, "status").text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 2
    wait.until(lambda d: health(server.url)["cancelled"] == cancelled + 1)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_stop_before_the_first_token_marks_the_reply_and_leaves_the_turn_out(served, slow_server, browser):
    _, cm = served
    server = slow_server()
    wait = open_greedy(browser, server.url, cm)
    box, status = browser.find_element(By.ID, "input"), browser.find_element(By.ID, "status")
    earlier, asked = "类型#裙*颜色#红色", "材质#棉"
    box.send_keys(earlier, Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]'))
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("textContent")
    posted(browser)

    # The next reply's generation waits at the gate: no token can come before Stop.
    server.engine.entered.clear()
    server.engine.gate.clear()
    cancelled = health(server.url)["cancelled"]
    box.send_keys(asked, Keys.ENTER)
    stopped = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
    wait.until(lambda d: server.engine.entered.is_set())
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: stopped.get_attribute("data-done") == "true")
    # Said on the bubble, not left an empty dashed box; the turn is marked as left out of the history.
    assert stopped.text == "(stopped before any reply)", stopped.text
    marker = stopped.find_element(By.CSS_SELECTOR, ".marker")
    assert marker.value_of_css_property("font-style") == "italic"
    assert "error" not in stopped.get_attribute("class")
    assert "stopped before any reply" in status.text and "not kept in the history" in status.text, status.text
    assert "error" not in status.get_attribute("class")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 2
    assert box.get_attribute("value") == asked  # nothing came of it: the words are back, to send again
    server.engine.gate.set()
    wait.until(lambda d: health(server.url)["cancelled"] == cancelled + 1)  # the server dropped it too

    # Sent again, the message follows the kept turn alone: the stopped one is not in the history.
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')) == 3)
    assert "error" not in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[2].get_attribute("class")
    assert posted(browser) == [turns(earlier, answer, asked)] * 2
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_errors_say_what_to_do_and_the_user_can_go_on(slow_server, browser):
    server = slow_server("api_key=sekrit", "max_prompt_tokens=120")
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    model = browser.find_element(By.ID, "model")
    wait.until(lambda d: "API key" in model.text)
    status = browser.find_element(By.ID, "status")
    box = browser.find_element(By.ID, "input")

    def sent():
        return browser.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')

    def send(text: str | None = None) -> None:
        n = len(sent())
        if text is not None:
            box.send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(sent()) == n + 1)

    # No key yet: the error says where the key goes, and the words come back to the input to send again.
    markup = '<b>bold</b> <img src=x onerror="window.injected = 1"> & **not markdown**'
    send(markup)
    assert "under Settings" in status.text, status.text
    assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
    assert box.get_attribute("value") == markup
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 2
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == markup  # shown as text, never as markup
    assert browser.find_elements(By.CSS_SELECTOR, "#messages b, #messages img") == []

    key = browser.find_element(By.ID, "api_key")
    key.send_keys("sekrit", Keys.TAB)  # leaving the field: the page asks /health again, with the key
    wait.until(lambda d: "checkpoint" in model.text)
    assert status.text == "", status.text  # the refused key's line went with the refusal
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("4")  # short replies: the history stays far below max_prompt_tokens
    send()  # the words given back, now with the key
    last = sent()[-1]
    assert "error" not in last.get_attribute("class"), last.text
    assert box.get_attribute("value") == "" and "error" not in status.get_attribute("class")
    wait.until(lambda d: "checkpoint" in model.text)  # the key reached /health as well
    assert browser.execute_script("return window.injected") is None

    # A message over the server's limit on its own: its message, what to do, the words back, and the history as
    # it was (leaving the earlier turn out would not have made room).
    long = "类型#裙*颜色#红色*风格#复古" * 8
    posted(browser)
    send(long)
    assert "max_prompt_tokens" in status.text and "shorten your message" in status.text, status.text
    assert "even without the 1 earlier turn" in status.text, status.text
    assert len(posted(browser)) == 1  # the refusal said so: the request without that turn was not even tried
    assert box.get_attribute("value") == long
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 4  # the two failed turns alone
    box.clear()
    send("材质#棉")
    assert "error" not in sent()[-1].get_attribute("class")

    # The server goes away in the middle of a reply, then cannot be reached at all.
    tokens.clear()
    tokens.send_keys("200")
    box.send_keys("类型#上衣")
    browser.find_element(By.ID, "send").click()
    streaming = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    wait.until(lambda d: chunks_of(streaming) >= 3)
    server.server.force_exit = True  # no waiting for the stream to end
    server.stop()
    wait.until(lambda d: streaming.get_attribute("data-done") == "true")
    assert "connection to the server was lost" in status.text, status.text
    assert "error" in streaming.get_attribute("class") and box.get_attribute("value") == "类型#上衣"
    send()
    assert "cannot reach the server" in status.text, status.text
    assert box.get_attribute("value") == "类型#上衣"


def test_a_reload_keeps_the_conversation(served, browser):
    url, cm = served
    wait = open_greedy(browser, url, cm)
    box = browser.find_element(By.ID, "input")
    box.send_keys("类型#裙*颜色#红色", Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]'))
    def shown():
        return [(e.get_attribute("class"), e.get_attribute("textContent"))
                for e in browser.find_elements(By.CSS_SELECTOR, ".msg")]

    before = shown()

    browser.refresh()
    wait.until(lambda d: str(cm.checkpoint) in d.find_element(By.ID, "model").text)
    assert shown() == before
    # The restored turn is sent along with the next one, as if there had been no reload.
    browser.find_element(By.ID, "input").send_keys("材质#棉", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')) == 1)
    reply1 = before[1][1]
    second = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
    want = greedy(cm, prompt_ids(cm.tokenizer, "材质#棉", [("类型#裙*颜色#红色", reply1)], cm.template))
    assert second.get_attribute("textContent") == want

    browser.find_element(By.ID, "clear").click()
    browser.refresh()
    wait.until(lambda d: str(cm.checkpoint) in d.find_element(By.ID, "model").text)
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []


def test_enter_while_a_reply_streams_says_why_and_keeps_the_words(served, slow_server, browser):
    _, cm = served
    server = slow_server()
    wait = open_greedy(browser, server.url, cm)  # greedy: a reply of 200 slowed pieces, seconds long
    box, send = browser.find_element(By.ID, "input"), browser.find_element(By.ID, "send")
    hint = browser.find_element(By.ID, "hint")
    box.send_keys("类型#裙*颜色#红色", Keys.ENTER)
    streaming = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    wait.until(lambda d: chunks_of(streaming) >= 2)
    assert not hint.is_displayed()
    assert not send.is_enabled() and "press Stop" in send.get_attribute("title")

    box.send_keys("材质#棉", Keys.ENTER)  # the next message, while the reply still comes
    wait.until(lambda d: hint.is_displayed())
    assert "wait for it to end, or press Stop" in hint.text, hint.text
    assert streaming.get_attribute("data-done") != "true"
    assert box.get_attribute("value") == "材质#棉" and len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1
    inside = browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                    "return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight", hint)
    assert inside, "the hint is off the screen"

    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: streaming.get_attribute("data-done") == "true")
    assert not hint.is_displayed() and send.is_enabled() and not send.get_attribute("title")
    assert box.get_attribute("value") == "材质#棉"
    box.send_keys(Keys.ENTER)  # the words kept are sent now
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2)
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user")[1].text == "材质#棉"
    assert box.get_attribute("value") == ""
    browser.find_element(By.ID, "stop").click()


def test_an_empty_reply_is_marked_and_left_out_of_the_history(served, slow_server, browser):
    _, cm = served
    earlier, answer, asked = "类型#裙*颜色#红色", "显瘦的红色连衣裙", "材质#棉"
    # The reply's first token made an end-of-sequence one: the model ends its reply at once.
    eos = first_token(cm, prompt_ids(cm.tokenizer, asked, [(earlier, answer)], cm.template))
    server = slow_server(f"generation.extra_eos_token_ids=[{eos}]")
    browser.get(server.url + "/")
    # A conversation kept by the tab (as after a reload), with an empty answer as an older page kept them.
    stored = turns(earlier, answer, "类型#上衣", "")
    browser.execute_script("sessionStorage.setItem('ptune.history', arguments[0])", json.dumps(stored))
    wait = open_greedy(browser, server.url, cm)
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg")] == [earlier, answer]
    status = browser.find_element(By.ID, "status")
    box = browser.find_element(By.ID, "input")
    posted(browser)

    box.send_keys(asked, Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]'))  # (not restored ones)
    empty = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
    assert "error" not in empty.get_attribute("class")
    assert empty.text == "(empty reply)"
    marker = empty.find_element(By.CSS_SELECTOR, ".marker")
    assert marker.value_of_css_property("font-style") == "italic"
    assert "empty reply, so this turn is left out of the history" in status.text, status.text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 2  # the question and its empty answer
    assert box.get_attribute("value") == asked  # back in the input, to reword or send again
    assert posted(browser) == [turns(earlier, answer, asked)]

    # The next request carries the history without the empty turn (nor the stored one).
    box.clear()
    box.send_keys("类型#上衣", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')) == 2)
    assert posted(browser) == [turns(earlier, answer, "类型#上衣")]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_a_conversation_too_long_for_the_server_leaves_out_its_oldest_turns(served, slow_server, browser):
    _, cm = served
    asked = ["类型#裙*颜色#红色", "材质#棉", "类型#上衣"]
    last = "类型#裙*颜色#红色*风格#复古"
    said: list[tuple[str, str]] = []  # the turns the page will have, greedy replies of MAX_NEW tokens
    for text in asked:
        said.append((text, greedy(cm, prompt_ids(cm.tokenizer, text, said, cm.template))))

    def length(text, history):
        return len(prompt_ids(cm.tokenizer, text, history, cm.template))

    # A limit the whole conversation fits until the last message, which fits only after the newest turn.
    limit = max(length(asked[2], said[:2]), length(last, said[2:]))
    assert length(last, said[1:]) > limit
    server = slow_server(f"max_prompt_tokens={limit}")
    wait = open_greedy(browser, server.url, cm)
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_NEW))
    box, status = browser.find_element(By.ID, "input"), browser.find_element(By.ID, "status")

    def say(text: str):
        return send_and_wait(browser, wait, box, text)

    for text, _ in said:
        say(text)
    posted(browser)
    reply = say(last)
    assert "error" not in reply.get_attribute("class"), reply.text
    # Refused with three turns, the refusal saying that leaving out the oldest two makes room; taken with the
    # newest alone, whose reply it is: no request refused per turn left out.
    flat = [t for turn in said for t in turn]
    assert posted(browser) == [turns(*flat, last), turns(*flat[4:], last)]
    assert reply.get_attribute("textContent") == greedy(cm, prompt_ids(cm.tokenizer, last, said[2:], cm.template))
    assert "oldest 2 turns were left out" in status.text, status.text
    assert "error" not in status.get_attribute("class")
    shown = browser.find_elements(By.CSS_SELECTOR, "#messages > *")
    assert ["dropped" in e.get_attribute("class") for e in shown] == [True] * 4 + [False] * 5
    assert shown[4].get_attribute("id") == "left-out" and "left out" in shown[4].text
    assert "no longer sees" in shown[0].get_attribute("title")

    # Later requests start from the shorter history.
    say("材质#棉")
    answered = reply.get_attribute("textContent")
    assert posted(browser)[0] == turns(*flat[4:], last, answered, "材质#棉")

    # A reload shows the page as it was, the turns left out faded under the note, and sends only the others.
    def page():
        return [("dropped" in e.get_attribute("class"), e.get_attribute("id"), e.get_attribute("textContent"))
                for e in browser.find_elements(By.CSS_SELECTOR, "#messages > *")]

    before = page()
    dropped = sum(d for d, _, _ in before)
    assert dropped >= 4 and before[dropped][1] == "left-out" and all(d for d, _, _ in before[:dropped])
    browser.refresh()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages > *")) == len(before))
    assert page() == before
    kept = [text for dropped, id_, text in before if not dropped and id_ != "left-out"]
    box = browser.find_element(By.ID, "input")
    posted(browser)
    send_and_wait(browser, wait, box, "颜色#红色")
    assert posted(browser)[0] == turns(*kept, "颜色#红色")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert [e for e in errors if "400" not in e["message"]] == [], errors  # (Chromium logs each refusal)


def test_a_system_message_too_long_says_so_and_leaves_no_turn_out(served, slow_server, browser):
    _, cm = served
    asked = ["类型#裙*颜色#红色", "材质#棉"]
    system = "类型#裙*颜色#红色*风格#复古" * 8
    limit = 100
    assert len(prompt_ids(cm.tokenizer, "", [], cm.template, system)) > limit  # the system message alone
    server = slow_server(f"max_prompt_tokens={limit}")
    wait = open_greedy(browser, server.url, cm)
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("4")  # short replies: the conversation stays far below the limit
    box, status = browser.find_element(By.ID, "input"), browser.find_element(By.ID, "status")

    def say(text: str):
        return send_and_wait(browser, wait, box, text)

    said = []
    for text in asked:
        reply = say(text)
        assert "error" not in reply.get_attribute("class"), reply.text
        said += [text, reply.get_attribute("textContent")]
    browser.find_element(By.ID, "system").send_keys(system)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()  # closed: the error opens it again
    posted(browser)

    failed = say("类型#上衣")
    # One request, refused: leaving the earlier turns out could not have made room, so none was tried.
    assert posted(browser) == [[{"role": "system", "content": system}, *turns(*said, "类型#上衣")]]
    assert "error" in failed.get_attribute("class")
    assert "the system message is too long" in status.text and "shorten the system message under Settings" in \
        status.text, status.text
    assert "shorten your message" not in status.text
    assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")) == 2  # the failed turn alone
    assert browser.find_elements(By.ID, "left-out") == []
    assert box.get_attribute("value") == "类型#上衣"

    # Without the system message the same words go, after the whole history.
    browser.find_element(By.ID, "system").clear()
    box.clear()
    reply = say("类型#上衣")
    assert "error" not in reply.get_attribute("class"), reply.text
    assert posted(browser) == [turns(*said, "类型#上衣")]


def test_a_busy_server_answers_503_and_the_page_says_so(slow_server, browser):
    server = slow_server("max_queue=1")
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda d: "checkpoint" in d.find_element(By.ID, "model").text)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("4")  # a short reply once the server is free
    # Two long greedy replies: one generating (200 slowed pieces, seconds), one waiting, which max_queue=1 allows.
    body = json.dumps({"messages": turns("类型#裙*颜色#红色"), "stream": True, "temperature": 0,
                       "max_tokens": 200})
    held = []
    for n in (1, 2):
        conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        held.append((conn, conn.getresponse()))  # read no further: the reply keeps coming
        assert held[-1][1].status == 200
        # The first generating before the second comes (else the two would share a batch).
        wait.until(lambda d: health(server.url)["batches"] == 1 and health(server.url)["queued"] == n - 1)

    box, status = browser.find_element(By.ID, "input"), browser.find_element(By.ID, "status")
    box.send_keys("材质#棉", Keys.ENTER)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("data-done") == "true")
    assert "the server is busy, try again in a moment" in status.text and "max_queue=1" in status.text, status.text
    assert box.get_attribute("value") == "材质#棉"
    assert health(server.url)["batches"] == 1  # the refusal came while the first reply was still generating

    for conn, response in held:  # the two clients go away: their generation ends, the queue empties
        response.close()
        conn.close()
    wait.until(lambda d: health(server.url)["queued"] == 0)
    browser.find_element(By.ID, "send").click()  # the words given back, sent again
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')) == 2)
    last = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert "error" not in last.get_attribute("class"), last.text
    assert "error" not in status.get_attribute("class")


def test_a_page_on_another_origin_calls_the_api_only_where_cors_origins_lets_it(served, browser, tmp_path):
    """A page served from another origin (another port) calls the API with fetch, sending a key: Chromium's
    preflight and the reply pass where the server lists that origin in cors_origins, and Chromium blocks
    the call where it does not (the default)."""
    import functools
    import http.server

    from hydra import compose, initialize_config_dir

    url, cm = served
    (tmp_path / "page").mkdir()
    (tmp_path / "page" / "index.html").write_text("<!doctype html><title>elsewhere</title>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "page"))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    origin = "http://127.0.0.1:%d" % site.server_address[1]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"checkpoint={cm.checkpoint}", "device=cpu", f"max_new_tokens={MAX_NEW}",
                                          "api_key=k", f"cors_origins=[\"{origin}\"]"])
    open_to_page = LiveServer(create_app(cm, cfg))
    call = """
        const [api, done] = [arguments[0], arguments[arguments.length - 1]];
        fetch(api + "/v1/chat/completions", {method: "POST",
              headers: {"Authorization": "Bearer k", "Content-Type": "application/json"},
              body: JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 2})})
          .then(r => r.json().then(j => done({status: r.status, object: j.object || null})))
          .catch(e => done({error: String(e)}));
    """
    try:
        browser.set_script_timeout(60)
        browser.get(origin + "/index.html")
        assert browser.title == "elsewhere"
        assert browser.execute_async_script(call, open_to_page.url) == {"status": 200, "object": "chat.completion"}
        blocked = browser.execute_async_script(call, url)  # the default server: no cors_origins
        assert "Failed to fetch" in blocked.get("error", ""), blocked
    finally:
        open_to_page.stop()
        site.shutdown()


def test_on_a_model_of_few_positions_the_server_sizes_the_reply_unless_max_new_tokens_is_set(tiny_model_dir, browser):
    """A base GPT-2 of 512 positions: a default of 512 new tokens left no room for any prompt, and every message was
    refused. The field starts empty (the server's default, which fits the reply to the positions left)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("serve", overrides=["checkpoint=null", f"model.path={tiny_model_dir('gpt2')}",
                                          "model.template=plain", "device=cpu"])
    cm = load_chat_model(cfg)
    server = LiveServer(create_app(cm, cfg))
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.url + "/")
        wait.until(lambda d: "base model" in d.find_element(By.ID, "model").text)
        cap = health(server.url)["max_new_tokens"]
        tokens = browser.find_element(By.ID, "max_tokens")
        assert tokens.get_attribute("value") == ""
        assert tokens.get_attribute("placeholder") == f"server's default (up to {cap})"
        assert tokens.get_attribute("max") == str(cap)
        box, status = browser.find_element(By.ID, "input"), browser.find_element(By.ID, "status")
        posted_requests(browser)
        reply = send_and_wait(browser, wait, box, "hi")
        assert "error" not in reply.get_attribute("class"), reply.text
        assert "max_tokens" not in posted_requests(browser)[0]

        # Short turns, then a length the positions cannot hold beside any prompt: one refusal, which says what to
        # change, and no turn left out (leaving turns out would not make room).
        browser.find_element(By.ID, "clear").click()
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
        tokens.send_keys("2")
        for text in ("a", "b"):
            send_and_wait(browser, wait, box, text)
        tokens.clear()
        tokens.send_keys("512")
        posted_requests(browser)
        failed = send_and_wait(browser, wait, box, "c")
        assert "error" in failed.get_attribute("class")
        assert len(posted_requests(browser)) == 1
        assert "lower Max new tokens under Settings" in status.text, status.text
        assert "too long" not in status.text, status.text
        assert browser.find_elements(By.ID, "left-out") == []
    finally:
        server.stop()


def test_settings_numbers_are_read_whole_and_invalid_ones_are_refused_by_name(served, browser):
    url, cm = served
    wait = open_greedy(browser, url, cm)
    box, status = browser.find_element(By.ID, "input"), browser.find_element(By.ID, "status")
    tokens, temperature = browser.find_element(By.ID, "max_tokens"), browser.find_element(By.ID, "temperature")
    posted_requests(browser)

    def sent_with(field, value) -> dict:
        field.clear()
        field.send_keys(value)
        send_and_wait(browser, wait, box, "hi")
        [request] = posted_requests(browser)
        return {k: v for k, v in request.items() if k in ("temperature", "top_p", "max_tokens")}

    assert sent_with(tokens, "1e1") == {"temperature": 0, "top_p": 0.7, "max_tokens": 10}  # not 1 (parseInt)
    # An emptied temperature is the server's, and the field says so rather than showing a number.
    assert sent_with(temperature, "") == {"top_p": 0.7, "max_tokens": 10}
    assert temperature.get_attribute("placeholder") == "server's default"

    # What a field does not take: nothing sent, the field named with what it takes, the words kept.
    for field, value, said in [(tokens, "2.9", f"Max new tokens: a whole number from 1 to {MAX_NEW}"),
                               (tokens, "0", f"Max new tokens: a whole number from 1 to {MAX_NEW}"),
                               (tokens, "-3", f"Max new tokens: a whole number from 1 to {MAX_NEW}"),
                               (temperature, "3", "Temperature: a number from 0 to 2"),
                               (temperature, "1e", "Temperature: a number from 0 to 2")]:  # (not a number at all)
        field.clear()
        field.send_keys(value)
        browser.execute_script("arguments[0].textContent = ''", status)  # (the line of the value before)
        box.send_keys("again", Keys.ENTER)
        wait.until(lambda d: status.text)
        assert "error" in status.get_attribute("class")
        assert said in status.text, (value, status.text)
        assert box.get_attribute("value") == "again"
        assert posted_requests(browser) == []
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
        box.clear()
        field.clear()
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_a_reload_while_a_reply_streams_gives_the_question_back(slow_server, browser):
    server = slow_server()
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda d: "checkpoint" in d.find_element(By.ID, "model").text)
    box = browser.find_element(By.ID, "input")
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "max_tokens").send_keys("4")
    send_and_wait(browser, wait, box, "类型#裙*颜色#红色")
    browser.find_element(By.ID, "max_tokens").clear()  # the server's cap, 200 slowed pieces: seconds
    box.send_keys("材质#棉", Keys.ENTER)
    streaming = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    wait.until(lambda d: chunks_of(streaming) >= 3)

    browser.refresh()
    wait.until(lambda d: "checkpoint" in d.find_element(By.ID, "model").text)
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == ["类型#裙*颜色#红色"]
    assert browser.find_element(By.ID, "input").get_attribute("value") == "材质#棉"
    assert "interrupted by the reload" in browser.find_element(By.ID, "status").text
    # Once given back, the words are not given back again by the next reload.
    browser.find_element(By.ID, "input").clear()
    browser.refresh()
    wait.until(lambda d: "checkpoint" in d.find_element(By.ID, "model").text)
    assert browser.find_element(By.ID, "input").get_attribute("value") == ""
    assert browser.find_element(By.ID, "status").text == ""


def test_an_api_key_a_header_cannot_carry_is_named_and_a_server_back_clears_cannot_reach(slow_server, browser):
    server = slow_server("api_key=sekrit")
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    model, status = browser.find_element(By.ID, "model"), browser.find_element(By.ID, "status")
    wait.until(lambda d: "API key" in model.text)
    key, box = browser.find_element(By.ID, "api_key"), browser.find_element(By.ID, "input")
    key.send_keys("sekrit\u2019", Keys.TAB)  # a pasted curly apostrophe: fetch would throw on the header
    wait.until(lambda d: "a header cannot carry" in model.text)
    posted(browser)
    box.send_keys("hello", Keys.ENTER)
    wait.until(lambda d: "a header cannot carry" in status.text)
    assert "cannot reach" not in status.text and "error" in status.get_attribute("class")
    assert box.get_attribute("value") == "hello" and posted(browser) == []

    key.clear()
    key.send_keys("sekrit", Keys.TAB)
    wait.until(lambda d: "checkpoint" in model.text)
    assert status.text == ""
    # The server out of reach once (fetch fails as it does with no server), then back: the line goes.
    browser.execute_script("const real = window.fetch; window.fetch = (...a) => { window.fetch = real; "
                           "return Promise.reject(new TypeError('Failed to fetch')); }")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]'))
    assert "cannot reach the server" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
    wait.until(lambda d: status.text == "" and "checkpoint" in model.text)


def test_a_setting_typed_and_not_left_survives_a_reload(served, browser):
    url, cm = served
    wait = open_greedy(browser, url, cm)  # temperature typed, and the field not left
    browser.find_element(By.ID, "system").send_keys("Answer briefly.")
    browser.refresh()
    wait.until(lambda d: str(cm.checkpoint) in d.find_element(By.ID, "model").text)
    assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0"
    assert browser.find_element(By.ID, "system").get_attribute("value") == "Answer briefly."


def test_right_to_left_text_is_laid_out_right_to_left(served, browser):
    url, cm = served
    wait = open_greedy(browser, url, cm)
    box = browser.find_element(By.ID, "input")
    hebrew = "שלום, מה שלומך?"
    send_and_wait(browser, wait, box, hebrew)
    asked = browser.find_element(By.CSS_SELECTOR, ".msg.user")
    assert asked.get_attribute("dir") == "auto" and asked.value_of_css_property("direction") == "rtl"
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("dir") == "auto"
    box.send_keys(hebrew)
    assert box.get_attribute("dir") == "auto" and box.value_of_css_property("direction") == "rtl"
    browser.refresh()  # restored turns too
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user"))
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").value_of_css_property("direction") == "rtl"


# Answers the page's next chat request in the page itself, with the body in the pieces given: how a server or a
# proxy in front of it may frame a reply, down to a line break split between two reads.
ANSWER_NEXT = """
    const [pieces, type] = arguments;
    const real = window.fetch;
    window.fetch = (url, init) => {
      if (!String(url).endsWith("/v1/chat/completions")) return real(url, init);
      window.fetch = real;
      const bytes = new TextEncoder();
      const body = new ReadableStream({start(c) { for (const p of pieces) c.enqueue(bytes.encode(p)); c.close(); }});
      return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": type}}));
    };
"""


def sse_chunk(content: str | None = None, finish: str | None = None) -> str:
    delta = {} if content is None else {"content": content}
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_replies_framed_as_any_server_may_frame_them_are_read_whole(served, browser):
    url, cm = served
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: str(cm.checkpoint) in d.find_element(By.ID, "model").text)
    box, status = browser.find_element(By.ID, "input"), browser.find_element(By.ID, "status")
    events = [sse_chunk("Hel"), sse_chunk("lo"), sse_chunk(None, "stop"), "data: [DONE]"]
    sse = "text/event-stream"
    framings = {
        # Events ending in CRLF pairs, a CRLF split between two reads; lone CRs; a comment and an event name.
        "crlf": ["".join(e + "\r\n\r\n" for e in events)[:-1], "\n"],
        "cr": ["".join(e + "\r\r" for e in events)],
        "split": [p for e in events for p in (e[:7], e[7:] + "\r\n", "\r\n")],
        "comments": [": keep-alive\n\n", "event: message\n" + events[0] + "\n\n",
                     *(e + "\n\n" for e in events[1:])],
        "null": [events[0] + "\n\n", "data: null\n\n", "data: 3\n\n", *(e + "\n\n" for e in events[1:])],
    }
    for name, pieces in framings.items():
        browser.execute_script(ANSWER_NEXT, pieces, sse)
        reply = send_and_wait(browser, wait, box, name)
        assert reply.get_attribute("textContent") == "Hello", (name, reply.text)
        assert "error" not in reply.get_attribute("class") and status.text == "", (name, status.text)
    # A server (or proxy) that ignores stream: true answers one JSON completion: its reply, not "cut off".
    whole = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                "content": "whole reply"},
                                                       "finish_reason": "length"}]}
    browser.execute_script(ANSWER_NEXT, [json.dumps(whole)], "application/json")
    reply = send_and_wait(browser, wait, box, "json")
    assert reply.get_attribute("textContent") == "whole reply" and "error" not in reply.get_attribute("class")
    assert status.text == "stopped at the token limit"
    assert [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")] == []
    # A stream cut short is still said to be.
    browser.execute_script(ANSWER_NEXT, [events[0] + "\r\n\r\n"], sse)
    reply = send_and_wait(browser, wait, box, "cut")
    assert "the reply was cut off" in reply.text
