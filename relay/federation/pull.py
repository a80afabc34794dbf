"""Pulling an upstream relay's feed (``[[upstream]]``): the I/O shell around
:class:`~.federation.FeedReader`. The upstream's id of the last event taken is stored with the
events, in the same transaction, so a restart resumes exactly there."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from storage_events.relay.config import UpstreamConfig
from storage_events.relay.federation.core import (
    UPSTREAM_KEY,
    BadFeed,
    FeedReader,
    LoopGuard,
    PeerRefused,
)
from storage_events.relay.ingest.endpoint import Ingest
from storage_events.relay.ingest.session import ProtocolError, check_relayed

log = logging.getLogger("storage_events.relay")

MAX_BACKOFF = 10.0


class Puller:
    def __init__(self, cfg: UpstreamConfig, ingest: Ingest, me: str) -> None:
        self.cfg = cfg
        self.name = cfg.label
        self.key = ""  # the checkpoint's key, known once the upstream's epoch is
        self.ingest = ingest
        self.connected = False
        self.loops = LoopGuard(me, f"upstream {self.name!r}")
        self.me = me

    @property
    def checkpoint(self) -> int:
        """The last of the upstream's ids stored here (by this relay: for status pages)."""
        return self.ingest.log.held(self.key) if self.key else 0

    async def run(self) -> None:
        backoff = 0.5
        timeout = httpx.Timeout(10.0, read=self.cfg.idle_timeout)
        headers = {"Accept": "text/event-stream"}
        if self.cfg.token:
            headers["Authorization"] = f"Bearer {self.cfg.token}"
        async with httpx.AsyncClient(
            timeout=timeout, headers=headers, verify=self.cfg.ca_file or True
        ) as client:
            while True:
                try:
                    await self._pull(client)
                    backoff = 0.5  # it ended cleanly (the upstream restarts): come back soon
                except PeerRefused as e:
                    log.error("upstream %s refused the feed: %s", self.name, e)
                except (httpx.HTTPError, OSError) as e:
                    log.warning(
                        "upstream %s unreachable (%s: %s); retrying in %.0f s",
                        self.name,
                        type(e).__name__,
                        e,
                        backoff,
                    )
                except BadFeed as e:
                    # Its feed is broken or hostile: what was taken before is stored, the rest
                    # is not buffered; the next try starts after the last event stored. It would
                    # most likely send the same again, so it is not retried soon.
                    backoff = max(backoff, self.cfg.broken_feed_retry)
                    log.error("%s; dropped the connection, retrying in %.1f s", e, backoff)
                except Exception:
                    log.exception(
                        "pulling upstream %s failed; retrying in %.0f s", self.name, backoff
                    )
                finally:
                    self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max(MAX_BACKOFF, backoff))

    async def _pull(self, client: httpx.AsyncClient) -> None:
        # The checkpoint is per epoch of the upstream's log: if that log was started afresh,
        # its ids start again, and so does the pull (what we hold already is not stored twice).
        base = self.cfg.url.rstrip("/")
        health = await client.get(base + "/healthz")
        if health.status_code != 200:
            raise PeerRefused(f"HTTP {health.status_code} from {health.url}")
        try:
            epoch = int(health.json().get("epoch", 0))
        except (ValueError, TypeError, AttributeError):
            raise PeerRefused(f"{health.url} did not answer as a storage-events relay") from None
        if health.json().get("relay") == self.me:
            # Every event it sends names it in `via`: all would be dropped as a loop.
            raise PeerRefused(
                f"{base} is also called {self.me!r}: give each relay of a federation its own "
                "`name` (or leave it unset on both: each then makes its own)"
            )
        self.key = UPSTREAM_KEY.format(self.name, epoch)
        # (From the store: on a shared one, another relay may have taken in more.)
        since = await self.ingest.log.position(self.key)
        url = base + "/events"
        params = {"since": str(since) if since else "earliest"}
        async with client.stream("GET", url, params=params) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode("utf-8", "replace").strip()[:500]
                raise PeerRefused(f"HTTP {r.status_code} from {url}: {body}")
            self.connected = True
            log.info("pulling upstream %s (%s) after its id %d", self.name, url, since)
            reader = FeedReader(self.name)
            async for chunk in r.aiter_bytes():
                taken = reader.feed(chunk, time.time_ns())
                if taken.last_id is not None:
                    try:
                        check_relayed(taken.events, 0, None)
                    except ProtocolError as e:
                        raise PeerRefused(f"it sent an event this relay cannot take: {e}") from None
                    fresh = self.loops.admit(taken.events)
                    self.ingest.count_loops(self.loops)
                    await self.ingest.store(fresh, (self.key, taken.last_id))
                if taken.reconnect:
                    return
