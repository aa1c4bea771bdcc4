"""The chat page in a real headless Chromium: it shows the checkpoint, streams replies and keeps the history.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped without them.
A screenshot is kept at outputs/test-artifacts/web_chat.png.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptune.chat import load_chat_model
from ptune.data import prompt_ids
from ptune.evaluate import predict

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


def test_page_streams_replies_and_keeps_history(served, browser):
    url, cm = served
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: str(cm.checkpoint) in d.find_element(By.ID, "model").text)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")  # greedy, to compare with evaluate's output

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
