"""The Streamlit app, driven in headless Debian chromium: a typed question gets an answer and a source."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from retrieval.kb import KnowledgeBase
from tests.conftest import DOCS, free_port, write_files

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture()
def app_url(settings, tmp_path):
    KnowledgeBase(settings, "policies", create=True).add_items(write_files(tmp_path / "d", DOCS), progress=False)
    cfg = tmp_path / "ui.yaml"
    cfg.write_text("models: {device: cpu, llm: null}\n", encoding="utf-8")  # extractive answers
    port = free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "ui" / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--", "--config", str(cfg)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "KB_HOME": str(settings.home)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "streamlit.log").read_text()
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield drv
    drv.quit()


def test_question_typed_in_the_page_gets_an_answer_with_its_source(app_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(app_url)
    wait = WebDriverWait(browser, 120)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']")))
    assert "policies" in browser.find_element(By.TAG_NAME, "body").text
    box.send_keys("How long does a refund take to reach my card?")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: "five working days" in d.find_element(By.TAG_NAME, "body").text)
    expanders = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "[data-testid='stExpander']")
                                      if "refunds.md" in e.text])
    assert expanders
    expanders[0].find_element(By.TAG_NAME, "summary").click()
    wait.until(lambda d: "original card" in expanders[0].text)


def _click(wait, css: str, label: str) -> None:
    """Click the element matching `css` whose text contains `label`, retrying across reruns."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By

    def attempt(d):
        try:
            for e in d.find_elements(By.CSS_SELECTOR, css):
                if label in e.text and e.is_enabled():
                    e.click()
                    return True
        except (StaleElementReferenceException, WebDriverException):
            return False
        return False

    wait.until(attempt)


def test_upload_in_the_page_ingests_with_progress(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    doc = tmp_path / "warranty.md"
    doc.write_text("# Warranty\n\nEvery laptop has a warranty of three years, parts and labour.", encoding="utf-8")
    browser.get(app_url)
    wait = WebDriverWait(browser, 120)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']")))
    _click(wait, "[role='tab']", "Documents")
    inp = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
    inp.send_keys(str(doc))
    _click(wait, "button", "Ingest 1 file")
    wait.until(lambda d: "Ingestion finished" in d.find_element(By.TAG_NAME, "body").text)
    assert "1 ingested" in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(tmp_path / "ui.png"))
    if os.environ.get("KB_UI_SHOT"):
        shutil.copy(tmp_path / "ui.png", os.environ["KB_UI_SHOT"])
