"""The Streamlit app: staff log in with an API key and see and change only the knowledge bases it
allows (driven in headless Debian chromium, one server for the module); its permission logic and its
refusal to run without keys (no browser)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException

from kb.paths import BadKBName
from kb.settings import ConfigError
from retrieval.knowledge_base import KnowledgeBase
from serve.auth import KeyRing, parse_grant
from tests.conftest import DOCS, free_port, write_files
from ui.app import authorize, login_delay, may_create, visible_kbs

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
needs_browser = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                   reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
KEYS = {"rw-key": ["*:rw"], "ro-key": ["policies"], "a-key": ["team-a:rw"]}
"""The app's keys (KB_API_KEYS): every KB and new ones; policies read-only; team-a only."""
TEAMS = {"team-a": {"a.md": "# Team A\n\nTeam A handles invoices."},
         "team-b": {"b.md": "# Team B\n\nTeam B handles payroll."}}


# permission logic --------------------------------------------------------------------------------
def test_a_key_sees_only_what_it_may_read_and_changes_only_what_it_may_write():
    ro, a, rw = (parse_grant(KEYS[k]) for k in ("ro-key", "a-key", "rw-key"))
    names = ["policies", "team-a", "team-b"]
    assert visible_kbs(ro, names) == ["policies"]
    assert visible_kbs(a, names) == ["team-a"]
    assert visible_kbs(rw, names) == names
    assert authorize(ro, "policies") == "policies"
    with pytest.raises(PermissionError, match="may not change"):
        authorize(ro, "policies", write=True)
    with pytest.raises(PermissionError, match="may not read"):
        authorize(a, "team-b")
    with pytest.raises(PermissionError, match="not logged in"):
        authorize(None, "policies")
    with pytest.raises(BadKBName):
        authorize(rw, "../etc", write=True)
    assert authorize(rw, "brand-new", write=True) == "brand-new"
    assert authorize(a, "team-a", write=True) == "team-a"


def test_a_new_knowledge_base_is_offered_only_to_a_key_that_may_write_a_name_not_taken():
    assert may_create(parse_grant(["*:rw"]), ["policies"])
    assert not may_create(parse_grant(["*", "policies:rw"]), ["policies"])
    assert not may_create(parse_grant(["team-a:rw"]), ["team-a", "team-b"])
    assert may_create(parse_grant(["team-a:rw"]), ["team-b"])


def test_failed_logins_wait_longer_each_time_up_to_a_cap():
    assert [login_delay(n) for n in (1, 2, 3, 4, 5, 9)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_without_keys_kb_ui_and_the_app_refuse_to_start(settings, monkeypatch, capsys):
    from streamlit.testing.v1 import AppTest

    from cli import main

    monkeypatch.delenv("KB_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="serve.api_keys.*KB_API_KEYS"):
        KeyRing.required(settings)
    started = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, *a, **k: started.append(cmd) or 0)
    assert main(["ui"]) == 2
    assert "KB_API_KEYS" in capsys.readouterr().err and not started
    monkeypatch.setenv("KB_API_KEYS", json.dumps(KEYS))
    assert main(["ui"]) == 0 and "streamlit" in started[0]
    monkeypatch.delenv("KB_API_KEYS")
    app = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=30).run()
    assert "serve.api_keys" in app.error[0].value and "KB_API_KEYS" in app.error[0].value
    assert not app.text_input and not app.button and not app.sidebar.selectbox


# the page in a browser ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _server() -> Iterator[dict]:
    """The module's one streamlit server (started by the first test that asks for `app`)."""
    state: dict = {}
    yield state
    if "proc" in state:
        state["proc"].terminate()
        state["proc"].wait(10)


@pytest.fixture()
def app(_server, settings, tmp_path) -> dict:
    """{"url", "log", "home"} of the app on the KBs policies, team-a and team-b with KEYS."""
    if "url" not in _server:
        KnowledgeBase(settings, "policies", create=True).add_items(write_files(tmp_path / "d", DOCS), progress=False)
        for name, files in TEAMS.items():
            KnowledgeBase(settings, name, create=True).add_items(write_files(tmp_path / name, files), progress=False)
        cfg = tmp_path / "ui.yaml"
        cfg.write_text("models: {device: cpu, llm: null}\n", encoding="utf-8")  # extractive answers
        port = free_port()
        log_path = tmp_path / "streamlit.log"
        with open(log_path, "wb") as log:
            _server["proc"] = proc = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", str(ROOT / "ui" / "app.py"), "--server.port", str(port),
                 "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
                 "--", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "KB_HOME": str(settings.home), "KB_API_KEYS": json.dumps(KEYS)})
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.3)
        _server.update(url=url, log_path=log_path, home=Path(settings.home))
    return {"url": _server["url"], "log": _server["log_path"], "home": _server["home"]}


@pytest.fixture(scope="module")
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


def _body(d) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.TAG_NAME, "body").text


def _login(browser, url: str, key: str):
    """Open a fresh session of the app and submit `key` in its login form; the wait to go on with."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "input[type='password']"))).send_keys(key)
    _click(wait, "button", "Log in")
    return wait


def _logged_in(wait):
    """Wait for the page after a login (its chat box is the last thing drawn); the chat box."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']")))


def _kb_options(browser) -> list:
    """Open the sidebar's knowledge-base list; its options (elements), [] while it has not opened."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    kb_select = browser.find_elements(By.CSS_SELECTOR, "[data-testid='stSidebar'] [data-testid='stSelectbox']")[0]
    kb_select.find_element(By.CSS_SELECTOR, "button[aria-haspopup='listbox']").click()
    try:
        return WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[role='option']"))
    except TimeoutException:
        return []


def _pick(browser, wait, name: str) -> None:
    """Choose knowledge base `name` in the sidebar (once the app lists it) and wait for its page."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def attempt(d) -> bool:
        try:
            hit = [o for o in _kb_options(d) if o.text == name]
            if hit:
                hit[0].click()
                return True
            d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        except (StaleElementReferenceException, WebDriverException):
            pass
        return False

    wait.until(attempt)
    wait.until(lambda d: [h for h in d.find_elements(By.TAG_NAME, "h1") if h.text == name])


@needs_browser
def test_a_wrong_key_gets_an_error_and_no_knowledge_base(app, browser):
    from selenium.webdriver.common.by import By

    wait = _login(browser, app["url"], "wrong-key-123")
    wait.until(lambda d: "Invalid API key" in _body(d))
    body = _body(browser)
    assert not any(n in body for n in ("policies", "team-a", "team-b", "Documents"))
    assert not browser.find_elements(By.CSS_SELECTOR, "textarea, input[type='file']")
    assert browser.find_elements(By.CSS_SELECTOR, "input[type='password']")  # the form again
    logged = app["log"].read_text(errors="replace")
    assert "failed UI login" in logged and "wrong-key-123" not in logged


@needs_browser
def test_a_read_only_key_asks_with_sources_but_cannot_upload_or_delete(app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec

    wait = _login(browser, app["url"], "ro-key")
    box = _logged_in(wait)
    assert "ro-key" not in browser.current_url
    assert "policies" in _body(browser) and "New knowledge base" not in _body(browser)
    box.send_keys("How long does a refund take to reach my card?")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: "five working days" in _body(d))
    expanders = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "[data-testid='stExpander']")
                                      if "refunds.md" in e.text])
    expanders[0].find_element(By.TAG_NAME, "summary").click()
    wait.until(lambda d: "original card" in expanders[0].text)
    _click(wait, "[role='tab']", "Documents")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stDataFrame']")))
    assert not browser.find_elements(By.CSS_SELECTOR, "input[type='file']")
    assert not [b for b in browser.find_elements(By.TAG_NAME, "button") if "Delete document" in b.text]
    # the chunks and their key information are shown (a second table), not offered for editing
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid='stDataFrame']")) == 2)
    assert "Show the chunks of" in _body(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, "textarea[aria-label='Chunk text']")


@needs_browser
def test_a_key_for_one_knowledge_base_does_not_see_another(app, browser):

    wait = _login(browser, app["url"], "a-key")
    _logged_in(wait)
    body = _body(browser)
    assert "team-a" in body and "team-b" not in body and "policies" not in body
    assert "New knowledge base" not in body  # team-a is its only writable name, and it exists
    assert [o.text for o in _kb_options(browser)] == ["team-a"]


@needs_browser
def test_a_read_write_key_creates_a_knowledge_base_by_upload_and_logs_out(app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec

    doc = tmp_path / "warranty.md"
    doc.write_text("# Warranty\n\nEvery laptop has a warranty of three years, parts and labour.", encoding="utf-8")
    wait = _login(browser, app["url"], "rw-key")
    _logged_in(wait)
    assert all(n in _body(browser) for n in ("policies", "New knowledge base"))
    new = browser.find_element(By.CSS_SELECTOR, "input[aria-label='New knowledge base']")
    new.send_keys("handbook")
    new.send_keys(Keys.ENTER)
    _pick(browser, wait, "handbook")
    _click(wait, "[role='tab']", "Documents")
    wait.until(lambda d: "This knowledge base is empty" in _body(d))
    inp = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
    inp.send_keys(str(doc))
    _click(wait, "button", "Ingest 1 file")
    wait.until(lambda d: "Ingestion finished" in _body(d))
    assert "1 ingested" in _body(browser)
    assert (app["home"] / "handbook" / "store.sqlite").is_file()
    browser.save_screenshot(str(tmp_path / "ui.png"))
    if os.environ.get("KB_UI_SHOT"):
        shutil.copy(tmp_path / "ui.png", os.environ["KB_UI_SHOT"])
    _click(wait, "button", "Log out")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='password']")))
    assert "handbook" not in _body(browser)


@needs_browser
def _textarea_holding(driver, text: str):
    """The chunk-text area once its value holds `text` (False meanwhile, also while re-rendered)."""
    from selenium.webdriver.common.by import By

    try:
        for area in driver.find_elements(By.CSS_SELECTOR, "textarea[aria-label='Chunk text']"):
            if text in (area.get_attribute("value") or "") and area.is_enabled():
                return area
    except StaleElementReferenceException:
        return False
    return False


def test_staff_see_a_documents_chunks_and_save_an_edit(app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from ingest.store import DocStore

    new = "Refunds reach the original card within five working days; store credit takes one hour."
    wait = _login(browser, app["url"], "rw-key")
    _logged_in(wait)
    _pick(browser, wait, "policies")
    _click(wait, "[role='tab']", "Documents")
    wait.until(lambda d: "Chunks" in _body(d) and "Show the chunks of" in _body(d))  # refunds.md comes first

    def fill_in() -> None:
        """Type the edit into the form once Streamlit has stopped re-rendering it."""
        area = wait.until(lambda d: _textarea_holding(d, "Customers can return a product"))
        area.send_keys(Keys.CONTROL, "a")
        area.send_keys(Keys.DELETE)
        area.send_keys(new)
        name_field = "input[aria-label='Your name (recorded with the edit)']"
        browser.find_element(By.CSS_SELECTOR, name_field).send_keys("Ulla")

    for attempt in range(3):  # a re-render can replace the form's elements under the driver
        try:
            fill_in()
            break
        except StaleElementReferenceException:
            if attempt == 2:
                raise
    wait.until(lambda d: _textarea_holding(d, new))
    _click(wait, "button", "Save chunk")
    wait.until(lambda d: "Saved chunk 0 of refunds.md" in _body(d))
    with DocStore.for_kb(app["home"] / "policies", create=False) as store:
        [edit] = store.chunk_edits()
        texts = [c["text"] for c in store.chunks(edit["doc_id"])]
    assert edit["new_text"] == new and edit["user"].startswith("Ulla (api-key:") and new in texts
    assert "rw-key" not in edit["user"]
