"""The relay's web page in a real headless Chromium: it shows the live feed, only what the
visitor's token may read, and paths as text."""

from __future__ import annotations

import asyncio

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
