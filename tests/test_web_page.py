"""The relay's web page in a real headless Chromium: it shows the live feed, only what the
visitor's token may read, and paths as text."""

from __future__ import annotations

import asyncio
import time

from browser import Browser
from conftest import Relay, wait_for
from test_auth import B_EVENTS, CONFIG, TOKENS, ev, publish

ROWS = "[...document.querySelectorAll('#events tr')].map(r => r.cells[5].textContent)"


def test_web_page_shows_the_feed_a_token_may_read(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    assert asyncio.run(publish(relay, TOKENS["agent-b"], "b", "n1:b", B_EVENTS)) is None
    browser = Browser(tmp_path, procs)
    try:
        # Catch-up, scoped: this reader sees /data/b/public only, and the move into it without
        # where it came from.
        browser.goto(f"{relay.url}/?since=earliest&access_token={TOKENS['r-pub']}")
        wait_for(lambda: len(browser.js(ROWS) or []) == 2, 20, "two rows on the page")
        assert browser.js(ROWS) == ["/data/b/public/m", "/data/b/public/p1"]
        assert browser.js("document.getElementById('status')?.textContent") == "live"
        assert "access_token" not in browser.js("location.href")  # kept out of the history
        sites = "[...document.querySelectorAll('#sites tr')].map(r => r.cells[0].textContent)"
        wait_for(lambda: browser.js(sites) == ["b"], 20, "the site table")

        # Live, with a hostile name: shown as text, never as markup.
        hostile = "/data/b/public/<img src=x onerror=alert(1)>"
        private = "/data/b/private/unseen"
        assert (
            asyncio.run(
                publish(
                    relay,
                    TOKENS["agent-b"],
                    "b",
                    "n1:b",
                    [ev("b", "n1:b", 5, private), ev("b", "n1:b", 6, hostile)],
                )
            )
            is None
        )
        wait_for(lambda: len(browser.js(ROWS)) == 3, 20, "the live event on the page")
        assert browser.js(ROWS)[0] == hostile
        assert browser.js("document.querySelectorAll('img').length") == 0

        # No token: the feed refuses, and the page says it is not live.
        browser.js("sessionStorage.clear()")
        browser.goto(f"{relay.url}/?since=earliest")
        wait_for(
            lambda: browser.js("document.getElementById('status')?.textContent") == "reconnecting…",
            20,
            "the page to report the refused feed",
        )
        assert browser.js(ROWS) == []
    finally:
        browser.close()


def test_web_page_charts_pauses_and_resumes_where_it_was(tmp_path, procs):
    """Filters kept in the URL, the chart drawn, pause and resume, and after a reload the
    page catching up from the id it showed last. The screenshot is kept in test-artifacts/."""
    import base64
    import os
    from pathlib import Path

    from conftest import agents_connected, start_agent
    from test_dcache_api import write

    relay = Relay(tmp_path, procs)
    root = tmp_path / "w"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    browser = Browser(tmp_path, procs)
    page = f"{relay.url}/?path={root}/a&type=IN_CLOSE_WRITE"
    try:
        browser.goto(page)
        wait_for(
            lambda: browser.js("document.getElementById('status')?.textContent") == "live",
            20,
            "live",
        )
        for i in range(5):
            write(root / "a" / f"x{i}")
            write(root / "b" / f"y{i}")
        wait_for(lambda: len(browser.js(ROWS) or []) == 5, 20, "five rows")
        assert sorted(browser.js(ROWS)) == [str(root / "a" / f"x{i}") for i in range(5)]
        assert browser.js("document.querySelector('[name=path]').value") == f"{root}/a"
        wait_for(lambda: browser.js("window.chartPoints") > 0, 10, "the chart drawn")

        browser.js("document.getElementById('pause').click()")
        assert browser.js("document.getElementById('status').textContent") == "paused"
        write(root / "a" / "while-paused")
        time.sleep(1.5)
        assert len(browser.js(ROWS)) == 5  # nothing shown while paused
        browser.js("document.getElementById('pause').click()")
        wait_for(lambda: len(browser.js(ROWS)) == 6, 20, "the paused event after resuming")
        assert browser.js(ROWS)[0] == str(root / "a" / "while-paused")
        resume = browser.js("document.getElementById('resume').textContent")
        assert resume.startswith("resume after id ")

        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        artifacts = Path(
            os.environ.get("TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
        )
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "web-page.png").write_bytes(shot)
        assert shot.startswith(b"\x89PNG") and len(shot) > 10_000

        # Away, then back: only what came after the last id shown.
        browser.goto("about:blank")
        wait_for(lambda: browser.js("location.href") == "about:blank", 10, "the page left")
        write(root / "a" / "while-away")
        time.sleep(1.0)
        browser.goto(page)
        wait_for(
            lambda: browser.js(ROWS) == [str(root / "a" / "while-away")],
            20,
            "the catch-up",
        )
    finally:
        browser.close()
