"""The dashboard in a real browser: headless Chromium (Debian's package,
which `make test` installs when missing) driven by Playwright loads `GET /`
from a daemon with the real llama-server, a request is sent with the OpenAI
SDK, and the page's rendered DOM shows it, live, without a reload. A
screenshot is left under target/ for people to look at."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from e2e import MODEL_ALIAS, wait_until

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "target" / "dashboard.png"


def chromium() -> str:
    """The system's Chromium: a missing one is an error, never a skip."""
    for candidate in (os.environ.get("CONTEXTPILOTD_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise AssertionError("no Chromium: `make test` installs Debian's chromium (scripts/test-tools.sh)")


@pytest.fixture
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def newest_query_id(daemon) -> str:
    page = daemon.get("/requests/recent").json()
    assert page["requests"], page
    return page["requests"][-1]["query_id"]


def test_the_dashboard_shows_a_request_as_it_happens(daemon, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(daemon.root + "/")
    # The first poll has drawn the daemon's state and its slots.
    page.wait_for_selector("#state.ready", timeout=30_000)
    assert page.locator("#slots .slot").count() == daemon.status()["plan"]["slots"]
    assert page.locator("#models tbody tr[data-model]").count() == 1

    client = daemon.client(max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
    )
    assert answer.choices[0].message.content is not None
    daemon.wait_query_log(1)
    query_id = newest_query_id(daemon)

    # The open page shows it on its own: no reload.
    row = page.locator(f'#requests tr[data-query-id="{query_id}"]')
    row.wait_for(timeout=30_000)
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == query_id and cells[2] == MODEL_ALIAS, cells
    assert cells[3] == "/v1/chat/completions" and cells[4] == "200", cells
    wait_until(30, "the request counter to count it", lambda: page.locator("#c-requests").inner_text() == "1")
    # llama-server's own lines are shown as text.
    assert "llama" in page.locator("#log").inner_text()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
    assert errors == [], errors


def test_with_an_api_key_the_page_asks_for_it_and_then_shows_the_data(make_daemon, browser):
    daemon = make_daemon(server={"api_key": "dashboard-key"})
    # The page itself holds no data and loads without the key...
    response = httpx.get(daemon.root + "/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    # ...but its data does not.
    assert httpx.get(daemon.root + "/requests/recent").status_code == 401
    page = browser.new_page()
    page.goto(daemon.root + "/")
    page.wait_for_selector("#key-form:not([hidden])", timeout=30_000)
    page.fill("#key", "dashboard-key")
    page.click("#key-form button")
    page.wait_for_selector("#state.ready", timeout=30_000)
