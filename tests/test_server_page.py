"""The chat page in headless Chromium (Debian's chromium + chromedriver, driven by selenium):
the served model once the API key is entered; a message with an image (its thumbnail in the thread,
the reply's tokens/s and token counts); a scripted Markdown reply with thinking (a code block,
the thinking collapsed, script in the reply neither run nor kept; a screenshot of the exchange);
the Content-Security-Policy that backs the sanitiser; stopping a generation mid-stream (the server
cancels it and frees its row); a microphone recording (its player in the thread, its object URL
revoked by "new chat"). The README's test command installs chromium and its driver whenever
either is missing, so a missing browser fails these tests (a failed set-up, not a pass);
UNIGEMMA_SKIP_BROWSER_TESTS=1 skips them knowingly on a machine that cannot have one.
UNIGEMMA_SCREENSHOT_DIR=DIR also copies the screenshot there."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time

import httpx
import pytest
from PIL import Image, ImageStat
from server_helpers import Running, png_data_url, tiny_gemma

from unigemma.server import ServerConfig, create_app

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = " and ".join(name for name, path in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not path)
pytestmark = pytest.mark.skipif(bool(MISSING and os.environ.get("UNIGEMMA_SKIP_BROWSER_TESTS")),
                                reason=f"UNIGEMMA_SKIP_BROWSER_TESTS is set and {MISSING} is not installed")
KEY, MODEL = "page-key", "tiny-page"
# the scripted reply: Markdown with a code block, and HTML that must neither run nor stay
MARKDOWN = ("Here is **code**:\n\n```python\nprint(42)\n```\n\n"
            '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>')


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if MISSING:
        pytest.fail(f"{MISSING} not found: the README's test command installs Debian's chromium and "
                    "chromium-driver (apt-get install -y chromium chromium-driver)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = tmp_path_factory.mktemp("page")
    app = create_app(tiny_gemma(root), ServerConfig(model_name=MODEL, api_key=KEY, max_seqs=2, max_len=1024))
    image = root / "picture.png"
    image.write_bytes(base64.b64decode(png_data_url().split(",")[1]))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # the fake media flags give MediaRecorder a synthetic microphone (a beep) without a prompt
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--window-size=1100,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: script errors, CSP reports
    with Running(app) as server:
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            driver.get(server.url + "/")
            driver.image, driver.scheduler, driver.server_url = str(image), app.state.scheduler, server.url
            driver.grammars, driver.tokenizer = app.state.grammars, app.state.served.gemma.tokenizer
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


def reply_after(driver, n):
    """The reply after the first n, once it is done."""
    def done():
        last = replies(driver)[n:][-1:]
        return last and last[0].get_attribute("data-done") and last[0]

    return wait(done)


def enter_key(driver):
    """The API key, as a user types it (the page remembers it and fetches /v1/models again)."""
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("id", "apiKey")
    if field.get_attribute("value") != KEY:
        field.clear()
        field.send_keys(KEY + Keys.TAB)  # the change event comes with leaving the field
    wait(lambda: driver.find_element("id", "model").get_attribute("data-ready"))


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if "Uncaught" in e["message"] or "Content Security Policy" in e["message"]]


def test_the_served_model_shows_once_the_api_key_is_entered(page):
    model = page.find_element("id", "model")
    wait(lambda: "API key" in model.text)  # the server has a key: /v1/models is a 401 without it
    assert "problem" in model.get_attribute("class")
    enter_key(page)
    assert model.text == MODEL and "problem" not in model.get_attribute("class")
    assert not console_errors(page)  # the vendored scripts loaded under the page's policy and ran


def test_send_a_message_with_an_image_and_read_the_streamed_answer(page):
    enter_key(page)
    for button in ("attach", "record"):  # icons are SVG: no emoji font needed, no text in the button
        svg = page.find_element("css selector", f"#{button} svg")
        assert svg.is_displayed() and svg.size["width"] >= 16 and not page.find_element("id", button).text
    page.find_element("id", "file").send_keys(page.image)
    wait(lambda: "image" in page.find_element("id", "attachments").text)
    page.find_element("id", "maxTokens").clear()
    page.find_element("id", "maxTokens").send_keys("6")
    page.find_element("id", "input").send_keys("What is in this picture?")
    page.find_element("id", "send").click()
    reply = wait(lambda: [r for r in replies(page) if r.get_attribute("data-done")])[-1]
    assert reply.get_attribute("data-finish") == "length" and "error" not in reply.get_attribute("class")
    assert reply.find_element("css selector", ".content").text.strip()
    stats = reply.find_element("css selector", ".stats").text
    assert re.fullmatch(r"\d+\.\d tokens/s · \d+ prompt \+ 6 completion tokens", stats), stats
    assert int(stats.split(" · ")[1].split()[0]) > 100  # the image's soft tokens are in the prompt
    thumb = page.find_element("css selector", ".msg.user .media img")  # the picture went out with the message
    assert thumb.get_attribute("src").startswith("blob:")
    assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb) == 96


def scripted(page, lark: str):
    """Make the server's next generations follow `lark` (random weights write no Markdown)."""
    import llguidance

    original = page.scheduler.submit

    def submit(inputs, params, constraint=None):
        return original(inputs, params, constraint=page.grammars._constraint(
            llguidance.LLMatcher.grammar_from_lark(lark)))

    page.scheduler.submit = submit
    return original


def test_a_markdown_reply_is_rendered_sanitised_with_its_thinking_collapsed(page, tmp_path):
    enter_key(page)
    tok = page.tokenizer
    open_, close = tok.token_to_id("<|channel>"), tok.token_to_id("<channel|>")
    original = scripted(page, f'start: <[{open_}]> "thought\\n" /[a-z]{{3,8}}/ <[{close}]> {json.dumps(MARKDOWN)}')
    try:
        page.find_element("id", "think").click()
        page.find_element("id", "maxTokens").clear()
        page.find_element("id", "maxTokens").send_keys("300")
        page.find_element("id", "input").send_keys("Show me some code")
        n = len(replies(page))
        page.find_element("id", "send").click()
        reply = reply_after(page, n)
    finally:
        page.scheduler.submit = original
        page.find_element("id", "think").click()
    assert reply.get_attribute("data-finish") == "stop" and "error" not in reply.get_attribute("class"), reply.text
    content = reply.find_element("css selector", ".content")
    assert content.find_element("css selector", "pre > code").text == "print(42)"
    assert content.find_element("css selector", "strong").text == "code"
    html = content.get_attribute("innerHTML")
    assert "<script" not in html and "onerror" not in html and "pwned" not in html, html
    time.sleep(0.2)  # the stripped <img src=x> has failed to load by now (a 404 from this server)
    assert page.execute_script("return window.pwned") is None
    thinking = reply.find_element("css selector", "details.reasoning")
    assert thinking.get_attribute("open") is None  # collapsed: the summary shows, the thought does not
    assert thinking.find_element("css selector", "summary").is_displayed()
    assert not thinking.find_element("css selector", ".thought").is_displayed()
    assert thinking.find_element("css selector", ".thought").get_attribute("textContent").isalpha()
    assert "tokens/s" in reply.find_element("css selector", ".stats").text

    shot = tmp_path / "chat-page.png"
    assert page.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 600
        # not blank: many colours (thumbnail, code block, text), and real contrast
        assert len(im.convert("RGB").getcolors(1 << 20) or ()) > 50
        assert max(ImageStat.Stat(im.convert("L")).stddev) > 20
    assert 10_000 < shot.stat().st_size < 5_000_000
    if os.environ.get("UNIGEMMA_SCREENSHOT_DIR"):
        shutil.copy(shot, os.environ["UNIGEMMA_SCREENSHOT_DIR"])


def test_the_policy_forbids_inline_script_and_assets_keep_the_host_check(page):
    # DOMPurify is the first line; the Content-Security-Policy stops an inline handler that got past it
    page.execute_script("""
        const img = document.createElement("img");
        img.addEventListener("error", () => { window.failed = true; });
        img.setAttribute("onerror", "window.inlineRan = true");
        img.src = "/no-such-image"; document.body.appendChild(img);""")
    wait(lambda: page.execute_script("return window.failed"), timeout=10)
    assert page.execute_script("return window.inlineRan") is None
    for path in ("/", "/static/index.html"):
        r = httpx.get(page.server_url + path)
        csp = r.headers["content-security-policy"]
        assert r.status_code == 200 and "script-src 'self'" in csp and "unsafe" not in csp
    r = httpx.get(page.server_url + "/static/vendor/purify.min.js")
    assert r.status_code == 200 and "DOMPurify" in r.text
    assert httpx.get(page.server_url + "/static/vendor/nothing.js").status_code == 404
    assert httpx.get(page.server_url + "/static/page.js", headers={"Host": "evil.example"}).status_code == 400


def test_stop_aborts_the_stream_and_the_server_cancels(page):
    enter_key(page)
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
    enter_key(page)
    page.find_element("id", "record").click()
    time.sleep(1.0)
    page.find_element("id", "record").click()
    wait(lambda: "audio" in page.find_element("id", "attachments").text)
    page.find_element("id", "maxTokens").clear()
    page.find_element("id", "maxTokens").send_keys("2")
    n = len(replies(page))
    page.find_element("id", "send").click()
    reply = reply_after(page, n)
    assert "error" not in reply.get_attribute("class"), reply.text
    assert reply.get_attribute("data-finish") == "length"
    player = page.find_elements("css selector", ".msg.user .media audio")[-1]
    assert player.get_attribute("controls") is not None and player.get_attribute("src").startswith("blob:")

    # "new chat" empties the thread and revokes the object URLs it showed (picture and recording)
    media = [(e.tag_name, e.get_attribute("src")) for e in page.find_elements("css selector", ".msg.user .media > *")]
    assert {tag for tag, _ in media} == {"img", "audio"}
    assert loads(page, media) == [True] * len(media)
    page.find_element("id", "clear").click()
    assert not replies(page)
    assert loads(page, media) == [False] * len(media)


def loads(driver, media) -> list[bool]:
    """Whether each (tag, URL) still loads in a fresh element."""
    return driver.execute_async_script("""
        const [media, done] = arguments;
        Promise.all(media.map(([tag, url]) => new Promise((ok) => {
          const el = document.createElement(tag);
          el.addEventListener(tag === "img" ? "load" : "loadedmetadata", () => ok(true));
          el.addEventListener("error", () => ok(false));
          el.src = url;
        }))).then(done);""", media)
