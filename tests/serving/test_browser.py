"""The web page (chat and training-runs dashboard) in a real headless Chromium, through Selenium.

Skipped where Debian's ``chromium`` and ``chromium-driver`` are not installed. With
``BIT_AXON_SCREENSHOTS=DIR`` the tests also save screenshots of the page there.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

TIMEOUT = 30  # seconds; the test machine is slow
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no headless browser: install chromium and chromium-driver "
                    "(scripts/install-test-browser.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,1000")
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    browser.set_page_load_timeout(TIMEOUT)
    yield browser
    browser.quit()


def wait(driver, condition, message: str):
    return WebDriverWait(driver, TIMEOUT, ignored_exceptions=(StaleElementReferenceException,)).until(
        condition, message)


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("BIT_AXON_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def set_value(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def load(driver, url: str) -> None:
    """A fresh page (``get`` of the same page with another #fragment would not reload it)."""
    driver.get("about:blank")
    driver.get(url)


def open_chat(driver, live_server) -> None:
    load(driver, live_server.url + "/#chat")
    wait(driver, lambda d: len(Select(d.find_element(By.ID, "model-select")).options) == 3,
         "the model picker never listed the three models")


def test_page_loads_and_lists_the_models(driver, live_server):
    open_chat(driver, live_server)
    assert "bit-axon" in driver.title
    options = Select(driver.find_element(By.ID, "model-select")).options
    assert {o.get_attribute("value") for o in options} == {"tiny-llama", "ticket", "tiny-bitaxon"}
    assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0.7"
    assert driver.find_element(By.ID, "max-tokens").get_attribute("value") == "256"
    assert not driver.find_element(By.ID, "status").is_displayed()


def post_chat(live_server, body: dict) -> dict:
    request = urllib.request.Request(live_server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_chat_reply_streams_in_and_equals_the_non_streaming_reply(driver, live_server):
    open_chat(driver, live_server)
    Select(driver.find_element(By.ID, "model-select")).select_by_value("tiny-llama")
    set_value(driver, "temperature", "0")
    set_value(driver, "max-tokens", "16")
    driver.find_element(By.ID, "new-chat").click()
    set_value(driver, "chat-input", "the cat is")
    driver.find_element(By.ID, "send").click()

    def replied(d):
        # Send first: read before it, the text could be a moment older than the finished reply.
        if not d.find_element(By.ID, "send").is_enabled():
            return False
        replies = d.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")
        return (replies[-1].get_property("textContent") if replies else "") or False

    text = wait(driver, replied, "no streamed reply appeared (or Send stayed disabled)")
    users = driver.find_elements(By.CSS_SELECTOR, "#messages .message.user")
    assert [u.get_property("textContent") for u in users] == ["the cat is"]
    assert not driver.find_element(By.ID, "stop").is_enabled()
    assert driver.find_element(By.ID, "chat-input").get_property("value") == ""
    expected = post_chat(live_server, {"model": "tiny-llama", "messages": [{"role": "user", "content": "the cat is"}],
                                       "temperature": 0, "max_tokens": 16})
    assert text == expected["choices"][0]["message"]["content"]
    screenshot(driver, "page-chat.png")


def test_chat_shows_the_servers_error(driver, live_server):
    open_chat(driver, live_server)
    driver.find_element(By.ID, "new-chat").click()
    set_value(driver, "temperature", "5")  # the server allows 0..2
    set_value(driver, "chat-input", "hello")
    driver.find_element(By.ID, "send").click()
    status = driver.find_element(By.ID, "status")
    wait(driver, lambda d: status.is_displayed() and "temperature" in status.text,
         "the server's 400 about temperature was not shown")
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .message.error")
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")
    assert driver.find_element(By.ID, "chat-input").get_property("value") == "hello"  # back, to retry
    assert driver.find_element(By.ID, "send").is_enabled()


def metrics_line(step: int, **extra) -> str:
    record = {"step": step, "loss": round(3.0 / step, 4), "learning_rate": 1e-4 * min(1.0, step / 4),
              "tokens_per_sec": 900.0 + 10 * step, "step_time": 0.5, "peak_memory_gb": 1.25,
              "epoch": step / 40, **extra}
    return json.dumps(record) + "\n"


def test_dashboard_draws_a_run_and_follows_new_lines(driver, live_server, runs_root):
    run = runs_root / "run-a"
    run.mkdir()
    (run / "train_config.yaml").write_text("max_steps: 20\nlearning_rate: 0.0001\n")
    lines = [metrics_line(step) for step in range(1, 5)]
    lines.append(metrics_line(5, val_loss=0.9, val_perplexity=2.46,
                              samples=[{"prompt": "Say hi", "completion": "hi there"}]))
    (run / "metrics.jsonl").write_text("".join(lines))

    load(driver, live_server.url + "/#runs")
    wait(driver, lambda d: "run-a" in [o.get_attribute("value")
                                       for o in Select(d.find_element(By.ID, "run-select")).options],
         "run-a never appeared in the run picker")
    Select(driver.find_element(By.ID, "run-select")).select_by_value("run-a")
    chart = driver.find_element(By.ID, "loss-chart")
    assert chart.tag_name == "canvas"
    wait(driver, lambda d: chart.get_attribute("data-points") == "5", "the loss chart never drew 5 points")
    step = driver.find_element(By.ID, "run-step")
    assert "5 / 20" in step.text
    assert "hi there" in driver.find_element(By.ID, "samples").text
    assert driver.find_element(By.ID, "run-eta").text == "8s"  # 15 steps x 0.5 s, rounded

    with (run / "metrics.jsonl").open("a") as f:
        f.write("".join(metrics_line(s, temperature=41.0 + s, total_pause_time=float(s - 6)) for s in (6, 7, 8)))
    wait(driver, lambda d: chart.get_attribute("data-points") == "8", "the loss chart never grew to 8 points")
    wait(driver, lambda d: "8 / 20" in step.text, "the step counter did not reach 8 / 20")
    assert step.text == "step 8 / 20"
    assert driver.find_element(By.ID, "thermal-chart").get_attribute("data-points") == "6"
    status = driver.find_element(By.ID, "status")
    assert not status.is_displayed(), status.text
    screenshot(driver, "page-dash.png")
