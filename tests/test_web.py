"""The chat page in a real headless Chromium: it shows the checkpoint, streams replies and keeps the history,
stays usable through long replies, a narrow window, errors and a reload.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped without them.
Screenshots are kept at outputs/test-artifacts/web_chat.png (and web_chat_narrow.png, a phone's width).
"""

from __future__ import annotations

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
from ptune.data import prompt_ids
from ptune.evaluate import predict
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
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def greedy(cm, prompt: list[int]) -> str:
    gen = OmegaConf.create({"max_new_tokens": MAX_NEW, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "compile_step": False,
                            "seed": 0, "extra_eos_token_ids": []})
    return predict(cm.model, cm.tokenizer, [prompt], gen, 1, cm.device, progress=False)[0][0]


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

    def _generate(self, batch):
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
        servers.append(LiveServer(create_app(cm, cfg, SlowEngine(cm))))
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
    key.send_keys("sekrit")
    tokens = browser.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("4")  # short replies: the history stays far below max_prompt_tokens
    send()  # the words given back, now with the key
    last = sent()[-1]
    assert "error" not in last.get_attribute("class"), last.text
    assert box.get_attribute("value") == "" and "error" not in status.get_attribute("class")
    wait.until(lambda d: "checkpoint" in model.text)  # the key reached /health as well
    assert browser.execute_script("return window.injected") is None

    # A prompt over the server's limit: its message, a way out, and the words back.
    long = "类型#裙*颜色#红色*风格#复古" * 6
    send(long)
    assert "max_prompt_tokens" in status.text and "Clear" in status.text, status.text
    assert box.get_attribute("value") == long
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
