"""The chat page at `/`, used as a person uses it, in a real headless Chromium (Debian's chromium and
chromium-driver through Selenium; `.ci/run` installs them): the key, a streamed answer, stop, replay with
the same seed, a schema's parsed answer, token colours, editing, storage, and screenshots at desktop and
phone width (saved under build/screenshots, or $PHI4_SCREENSHOTS)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import API_KEY, Server

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromium-driver (apt install chromium chromium-driver)")
SCREENSHOTS = Path(os.environ.get("PHI4_SCREENSHOTS", Path(__file__).resolve().parent.parent / "build" / "screenshots"))


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                     "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no driver download
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(browser: WebDriver, condition: Any, seconds: float = 60) -> Any:  # noqa: ANN401
    return WebDriverWait(browser, seconds, poll_frequency=0.05).until(condition)


def element(browser: WebDriver, css: str) -> Any:  # noqa: ANN401
    return browser.find_element(By.CSS_SELECTOR, css)


def last_assistant(browser: WebDriver) -> Any:  # noqa: ANN401
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def set_field(browser: WebDriver, field_id: str, value: str) -> None:
    """Type into a settings field as a person does, and leave it (the page saves on change)."""
    field = browser.find_element(By.ID, field_id)
    field.clear()
    if value:
        field.send_keys(value)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def send(browser: WebDriver, text: str) -> None:
    box = browser.find_element(By.ID, "composer-input")
    box.send_keys(text)
    element(browser, "#send").click()


def answer_done(browser: WebDriver) -> Any:  # noqa: ANN401
    """Wait until the last answer has its figures line (the stream ended); return the message element."""
    wait(browser, lambda b: element(b, "#send").is_displayed()
         and b.find_elements(By.CSS_SELECTOR, ".message.assistant")
         and "tokens" in last_assistant(b).find_element(By.CSS_SELECTOR, ".stats").text)
    return last_assistant(browser)


@pytest.fixture(scope="module")
def page(browser: WebDriver, server: Server) -> WebDriver:
    """The page, opened fresh, with the key given through its dialog."""
    browser.get(f"{server.url}/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.get(f"{server.url}/")
    key = wait(browser, lambda b: b.find_element(By.ID, "api-key") if b.find_element(By.ID, "api-key").is_displayed()
               else False)
    key.send_keys("wrong-key")
    element(browser, "#key-submit").click()
    wait(browser, lambda b: "refused" in b.find_element(By.ID, "key-error").text)
    key.clear()
    key.send_keys(API_KEY)
    element(browser, "#key-submit").click()
    wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert browser.execute_script("return sessionStorage.getItem('phi4.apiKey')") == API_KEY
    assert browser.execute_script("return localStorage.getItem('phi4.apiKey')") is None  # this tab only
    element(browser, "#toggle-settings").click()
    return browser


def test_the_page_and_its_assets_need_no_key_and_no_network(server: Server) -> None:
    html = httpx.get(f"{server.url}/").text
    assert "<title>phi4 chat</title>" in html and "https://" not in html.split("<body>")[0]
    for asset in ("/ui/app.js", "/ui/style.css", "/ui/vendor/marked.umd.js", "/ui/vendor/purify.min.js",
                  "/ui/vendor/highlight.min.js"):
        assert httpx.get(f"{server.url}{asset}").status_code == 200, asset
    assert httpx.get(f"{server.url}/ui/config").json()["requires_api_key"] is True
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API itself still wants the key


def test_a_streamed_answer_appears(page: WebDriver) -> None:
    set_field(page, "max_tokens", "200")
    set_field(page, "seed", "")
    page.execute_script("""
        window.contentUpdates = 0;
        new MutationObserver(() => { window.contentUpdates += 1; })
          .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    send(page, "Hello there")
    message = answer_done(page)
    assert message.find_element(By.CSS_SELECTOR, ".content").text.strip()
    stats = message.find_element(By.CSS_SELECTOR, ".stats").text
    assert "first token" in stats and "tok/s" in stats and "200 tokens" in stats and "length" in stats
    assert page.execute_script("return window.contentUpdates") > 3, "the answer grew as it streamed"


def test_stop_aborts_a_long_answer(page: WebDriver, server: Server) -> None:
    element(page, "#new-chat").click()  # an empty context, so that 900 tokens fit in the demo's 1024
    set_field(page, "max_tokens", "900")
    generated_before = server.metric("phi4_generation_tokens_total")
    send(page, "Write a very long story")
    wait(page, lambda b: element(b, "#stop").is_displayed()
         and last_assistant(b).find_element(By.CSS_SELECTOR, ".content").text.strip())
    element(page, "#stop").click()
    message = wait(page, lambda b: element(b, "#send").is_displayed() and last_assistant(b))
    assert "stopped" in message.find_element(By.CSS_SELECTOR, ".stats").text
    deadline = time.monotonic() + 60
    while server.metric("phi4_num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("phi4_num_requests_running") == 0
    assert server.metric("phi4_generation_tokens_total") - generated_before < 900, "the server aborted it"


def test_replay_with_the_same_seed_gives_the_identical_answer(page: WebDriver) -> None:
    set_field(page, "max_tokens", "32")
    set_field(page, "seed", "7")
    set_field(page, "temperature", "1")
    send(page, "Tell me something surprising")
    message = answer_done(page)
    assert "seed 7" in message.find_element(By.CSS_SELECTOR, ".stats").text
    original = message.find_element(By.CSS_SELECTOR, ".content").text
    next(b for b in message.find_elements(By.TAG_NAME, "button") if b.text == "Replay same seed").click()
    result = wait(page, lambda b: "identical" in last_assistant(b).find_element(By.CSS_SELECTOR, ".replay-result").text
                  or "differs" in last_assistant(b).find_element(By.CSS_SELECTOR, ".replay-result").text)
    assert result and "identical answer" in last_assistant(page).find_element(By.CSS_SELECTOR, ".replay-result").text
    assert last_assistant(page).find_element(By.CSS_SELECTOR, ".content").text == original


def test_a_schema_answer_is_shown_parsed(page: WebDriver) -> None:
    set_field(page, "schema", "{not json")
    send(page, "Describe a person")
    assert "Not JSON" in element(page, "#schema-error").text  # checked before sending: nothing was sent
    assert "Describe a person" not in [m.text for m in page.find_elements(By.CSS_SELECTOR, ".message.user .content")]
    assert page.find_element(By.ID, "composer-input").get_attribute("value") == "Describe a person"  # kept
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    set_field(page, "max_tokens", "60")
    set_field(page, "schema", json.dumps(schema))
    element(page, "#send").click()
    message = answer_done(page)
    parsed = json.loads(message.find_element(By.CSS_SELECTOR, ".parsed-json").text)
    assert set(parsed) == {"name", "age"} and isinstance(parsed["age"], int)
    set_field(page, "schema", "")


def test_tokens_are_coloured_by_probability_with_alternatives(page: WebDriver) -> None:
    page.find_element(By.ID, "logprobs").click()
    set_field(page, "max_tokens", "8")
    send(page, "Colours please")
    message = answer_done(page)
    tokens = message.find_elements(By.CSS_SELECTOR, ".token")
    assert len(tokens) == 8
    titles = [token.get_attribute("title") for token in tokens]
    assert all("%" in title and title.count("\n") >= 5 for title in titles)  # its probability and 5 alternatives
    assert all("hsl" in token.get_attribute("style") or "rgb" in token.get_attribute("style") for token in tokens)
    page.find_element(By.ID, "logprobs").click()


def test_edit_resends_and_conversations_survive_a_reload(page: WebDriver, server: Server) -> None:
    set_field(page, "max_tokens", "8")
    user_messages = page.find_elements(By.CSS_SELECTOR, ".message.user")
    count = len(page.find_elements(By.CSS_SELECTOR, ".message"))
    next(b for b in user_messages[-1].find_elements(By.TAG_NAME, "button") if b.text == "Edit").click()
    editor = user_messages[-1].find_element(By.TAG_NAME, "textarea")
    editor.clear()
    editor.send_keys("An edited question")
    next(b for b in user_messages[-1].find_elements(By.TAG_NAME, "button") if b.text == "Save and resend").click()
    answer_done(page)
    assert len(page.find_elements(By.CSS_SELECTOR, ".message")) == count  # the old answer was replaced
    assert page.find_elements(By.CSS_SELECTOR, ".message.user .content")[-1].text == "An edited question"
    page.refresh()
    wait(page, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert page.find_elements(By.CSS_SELECTOR, ".message.user .content")[-1].text == "An edited question"
    element(page, "#toggle-settings").click()


def test_screenshots_at_desktop_and_phone_width(page: WebDriver) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    set_field(page, "max_tokens", "48")
    set_field(page, "seed", "7")
    element(page, "#new-chat").click()
    send(page, "Write a haiku about fast inference, then a Python one-liner.")
    answer_done(page)
    page.set_window_size(1280, 860)
    assert page.save_screenshot(str(SCREENSHOTS / "chat-desktop.png"))
    element(page, "#toggle-settings").click()  # a phone shows the chat alone
    page.set_window_size(390, 844)
    assert page.find_element(By.ID, "toggle-sidebar").is_displayed()  # the conversations fold away
    assert page.execute_script("return document.documentElement.scrollWidth") <= 390  # nothing wider than it
    assert page.save_screenshot(str(SCREENSHOTS / "chat-phone.png"))
    page.set_window_size(1280, 860)
