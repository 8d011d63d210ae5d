"""`flythinker serve`'s web page in headless Chromium: fill a profile and a query, watch the text
stream in, switch the lens colouring on, and keep a screenshot.

Needs selenium and Debian's ``chromium`` and ``chromium-driver`` (``make browser`` installs them);
skipped without them. The screenshot lands in the test's tmp_path, and also in
``$FLYTHINKER_SCREENSHOT_DIR`` when that is set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import live_server

from flythinker.commands.serve import create_app
from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import build_tiny, load_tokenizer

PROFILE_FILE = Path(__file__).resolve().parents[1] / "examples" / "profile_reviews.json"
QUERY = 'Generate the review text for a product with description "Kettle". The summary is "Fast."'
MAX_TOKENS = 24


def _binary(*names: str) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)",
                                    exc_type=ImportError)
    from selenium.webdriver.chrome.service import Service

    browser = _binary("chromium", "chromium-browser", "google-chrome")
    chromedriver = _binary("chromedriver")
    if browser is None or chromedriver is None:
        pytest.skip("no chromium/chromedriver binary (apt-get install chromium chromium-driver, or make browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--renderer-process-limit=1", "--disable-extensions"):
        options.add_argument(arg)
    # An explicit driver path: selenium's own manager would otherwise try to download one.
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    chrome.set_page_load_timeout(60)
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    tokenizer = load_tokenizer("tiny")
    flythinker = FlyThinker.from_models(build_tiny(32, seed=1), build_tiny(64, seed=2), tokenizer, fusion="pad")
    checkpoint = flythinker.save_pretrained(tmp_path_factory.mktemp("serve_browser") / "flythinker")
    app = create_app(str(checkpoint))
    with live_server(app) as url:
        yield url


def _backgrounds(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#panes .text .tok')]"
        ".map((s) => getComputedStyle(s).backgroundColor);")


def test_the_page_streams_text_and_colours_tokens_by_the_lens(driver, server_url, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    driver.get(f"{server_url}/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#panes .pane .text"))  # the models are listed
    assert "flythinker" in driver.find_element(By.ID, "served").text

    # The profile as a user pastes it: the example file's JSON ({"profile": [...]} is accepted).
    profile = driver.find_element(By.ID, "profile")
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
                          profile, PROFILE_FILE.read_text(encoding="utf-8"))
    assert json.loads(profile.get_attribute("value"))["profile"]
    driver.find_element(By.ID, "query").send_keys(QUERY)
    max_tokens = driver.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))
    lens_switch = driver.find_element(By.ID, "lens")
    assert not lens_switch.is_selected()

    driver.find_element(By.ID, "write").click()
    text = driver.find_element(By.CSS_SELECTOR, "#panes .pane .text")
    wait.until(lambda d: text.text.strip())  # streamed text appears
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done in"))
    status = driver.find_element(By.ID, "status")
    assert "error" not in (status.get_attribute("class") or ""), status.text
    assert text.text.strip()

    tokens = driver.find_elements(By.CSS_SELECTOR, "#panes .text .tok")
    assert tokens, "no token carries lens data"
    assert all(t.get_attribute("data-tip") for t in tokens)
    pane = driver.find_element(By.CSS_SELECTOR, "#panes .pane")
    assert "lens-on" not in pane.get_attribute("class")
    assert set(_backgrounds(driver)) == {"rgba(0, 0, 0, 0)"}  # lens off: no colouring

    lens_switch.click()
    wait.until(lambda d: "lens-on" in pane.get_attribute("class"))
    coloured = _backgrounds(driver)
    assert all(c.startswith("rgba(255, 140, 0,") for c in coloured), coloured
    shades = driver.execute_script("return [...document.querySelectorAll('#panes .text .tok')]"
                                   ".map((s) => s.style.getPropertyValue('--lens'));")
    assert shades and all(0.1 <= float(s) <= 1 for s in shades), shades

    # Hovering a token shows the reasoner's top tokens.
    ActionChains(driver).move_to_element(tokens[0]).perform()
    tip = driver.find_element(By.ID, "tip")
    wait.until(lambda d: tip.is_displayed())
    assert tip.text.startswith("written ")

    shot = tmp_path / "serve_page.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0
    if os.environ.get("FLYTHINKER_SCREENSHOT_DIR"):
        keep = Path(os.environ["FLYTHINKER_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep / shot.name)

    lens_switch.click()  # and off again
    wait.until(lambda d: "lens-on" not in pane.get_attribute("class"))
    assert set(_backgrounds(driver)) == {"rgba(0, 0, 0, 0)"}
