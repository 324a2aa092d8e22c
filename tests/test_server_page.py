"""The chat page in headless Chromium (Debian's chromium + chromedriver, driven by selenium):
send a message with an image, read the streamed answer, stop a generation mid-stream (the
server cancels it and frees its row). The README's test command installs chromium and its driver
whenever either is missing, so a missing browser fails these tests (a failed set-up, not a pass);
UNIGEMMA_SKIP_BROWSER_TESTS=1 skips them knowingly on a machine that cannot have one."""

from __future__ import annotations

import base64
import os
import shutil
import time

import pytest
from server_helpers import Running, png_data_url, tiny_gemma

from unigemma.server import ServerConfig, create_app

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = " and ".join(name for name, path in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not path)
pytestmark = pytest.mark.skipif(bool(MISSING and os.environ.get("UNIGEMMA_SKIP_BROWSER_TESTS")),
                                reason=f"UNIGEMMA_SKIP_BROWSER_TESTS is set and {MISSING} is not installed")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if MISSING:
        pytest.fail(f"{MISSING} not found: the README's test command installs Debian's chromium and "
                    "chromium-driver (apt-get install -y chromium chromium-driver)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = tmp_path_factory.mktemp("page")
    app = create_app(tiny_gemma(root), ServerConfig(max_seqs=2, max_len=1024))
    image = root / "picture.png"
    image.write_bytes(base64.b64decode(png_data_url().split(",")[1]))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # the fake media flags give MediaRecorder a synthetic microphone (a beep) without a prompt
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):
        options.add_argument(flag)
    with Running(app) as server:
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            driver.get(server.url + "/")
            driver.image, driver.scheduler = str(image), app.state.scheduler
            yield driver
        finally:
            driver.quit()
            app.state.scheduler.stop()


def wait(predicate, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def replies(driver):
    return driver.find_elements("css selector", ".msg.assistant")


def test_send_a_message_with_an_image_and_read_the_streamed_answer(page):
    page.find_element("id", "file").send_keys(page.image)
    wait(lambda: "image" in page.find_element("id", "attachments").text)
    page.find_element("id", "maxTokens").clear()
    page.find_element("id", "maxTokens").send_keys("6")
    page.find_element("id", "input").send_keys("What is in this picture?")
    page.find_element("id", "send").click()
    reply = wait(lambda: [r for r in replies(page) if r.get_attribute("data-done")])[-1]
    assert reply.get_attribute("data-finish") == "length" and "error" not in reply.get_attribute("class")
    assert reply.find_element("css selector", ".content").text.strip()
    assert page.find_elements("css selector", ".msg.user img")  # the picture went out with the message


def test_stop_aborts_the_stream_and_the_server_cancels(page):
    page.find_element("id", "maxTokens").clear()
    page.find_element("id", "maxTokens").send_keys("900")
    page.find_element("id", "input").send_keys("Tell me a long story")
    before = page.scheduler.tokens_out
    page.find_element("id", "send").click()
    n = len(replies(page))
    wait(lambda: replies(page)[-1].find_element("css selector", ".content").text.strip() and len(replies(page)) == n)
    page.find_element("id", "stop").click()
    reply = wait(lambda: replies(page)[-1] if replies(page)[-1].get_attribute("data-done") else None)
    assert reply.get_attribute("data-finish") == "stopped"
    wait(lambda: not page.scheduler.running and not page.scheduler.waiting, timeout=10)
    assert page.scheduler.cache.n == 0  # the aborted fetch cancelled the request and freed its row
    assert page.scheduler.tokens_out - before < 900  # ... long before its max_tokens
    assert page.find_element("id", "send").is_enabled()


def test_microphone_recording_is_sent_and_decoded(page):
    # MediaRecorder gives webm/opus: the server decodes it with PyAV; a decode failure would be a 400
    page.find_element("id", "record").click()
    time.sleep(1.0)
    page.find_element("id", "record").click()
    wait(lambda: "audio" in page.find_element("id", "attachments").text)
    page.find_element("id", "maxTokens").clear()
    page.find_element("id", "maxTokens").send_keys("2")
    n = len(replies(page))
    page.find_element("id", "send").click()
    reply = wait(lambda: len(replies(page)) > n and replies(page)[-1].get_attribute("data-done") and replies(page)[-1])
    assert "error" not in reply.get_attribute("class"), reply.text
    assert reply.get_attribute("data-finish") == "length"
