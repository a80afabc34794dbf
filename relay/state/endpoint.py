"""``GET /state?path=P[&site=S][&limit=N][&after=CURSOR]``: the namespace view as JSON, page by
page: the entry at ``P`` and everything below it that the reader may see, in the fields of an
event, by site and then depth first (a directory before its contents)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from storage_events.namespace import as_event, path_of
from storage_events.relay.auth import AuthError
from storage_events.relay.feed.endpoint import Feed
from storage_events.relay.feed.filters import FilterError, normalize_prefix
from storage_events.relay.state.reader import View

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000

_cursor = msgspec.msgpack.Decoder(tuple[str, bytes])


def cursor(site: str, key: bytes) -> str:
    return base64.urlsafe_b64encode(msgspec.msgpack.encode((site, key))).decode()


def parse_cursor(text: str) -> tuple[str, bytes]:
    try:
        return _cursor.decode(base64.urlsafe_b64decode(text.encode()))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise FilterError(
            f"after={text[:80]!r} is not a cursor this relay gave (use a page's 'next')"
        ) from None


def state_endpoint(view: View | None, feed: Feed) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        if view is None:
            return PlainTextResponse(
                "this relay keeps no namespace view (namespace = false in its config)\n",
                status_code=404,
            )
        try:
            _, scope = feed.authorize(request)
        except AuthError as e:
            return feed.refusal(e)
        q = request.query_params
        try:
            path = normalize_prefix(q.get("path", "/"))
            sites = q.getlist("site") or None
            limit = int(q.get("limit", DEFAULT_LIMIT))
            if not 1 <= limit <= MAX_LIMIT:
                raise FilterError(f"limit must be 1 to {MAX_LIMIT:,}")
            after = parse_cursor(q["after"]) if "after" in q else None
        except FilterError as e:
            return PlainTextResponse(f"{e}\n", status_code=400)
        except ValueError:
            return PlainTextResponse(f"limit must be a number, 1 to {MAX_LIMIT:,}\n", 400)
        if scope is not None and scope.sites is not None:
            sites = sorted(set(sites or scope.sites) & scope.sites)
        page = await view.listing(sites, path.encode(), after, limit)
        entries = [
            msgspec.to_builtins(as_event(site, key, e))
            for site, key, e in page.entries
            if scope is None or scope.allows(site, path_of(key)[0])
        ]
        return JSONResponse(
            {
                "id": page.id,
                "path": path,
                "entries": entries,
                "next": cursor(*page.next) if page.next is not None else None,
            }
        )

    return endpoint
