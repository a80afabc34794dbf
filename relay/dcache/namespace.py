"""``GET /api/v1/namespace/{path}[?children=true]``: the relay's namespace view in the shape
dCache's frontend gives a path's attributes (its FileResources and JsonFileAttributes), for
the dCache clients that list a directory before they watch it (SURF's ``ada``, panoptes, the
reference client's ``-r``). They read ``fileType`` and ``children[].fileName``/``fileType``.

The view holds what the events said, not the file system: sizes and modes come from the
agent's ``fstatat`` when it made one; ``pnfsId`` is a stable name for the path, as this relay
has no file ids; the sites a reader may see are merged (``site=`` narrows them, as on
``/events``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from storage_events.namespace import Entry
from storage_events.relay.auth import AuthError
from storage_events.relay.dcache.api import problem
from storage_events.relay.feed.endpoint import Feed
from storage_events.relay.feed.filters import FilterError, Scope, normalize_prefix, under
from storage_events.relay.state.reader import View

FOLDER = "application/vnd.dcache.folder"


def attributes(site: str, key: bytes, e: Entry | None) -> dict[str, Any]:
    """One path's attributes as dCache writes them (null fields left out, as its JSON is)."""
    is_dir = e is None or e.is_dir
    ms = ((e.mtime if e.mtime is not None else e.ts) // 1_000_000) if e is not None else 0
    mode = e.mode & 0o7777 if e is not None and e.mode is not None else None
    return {
        "fileMimeType": FOLDER if is_dir else "application/octet-stream",
        "fileType": "DIR" if is_dir else "REGULAR",
        "pnfsId": hashlib.sha1(site.encode() + b"\0" + key).hexdigest()[:36].upper(),
        "nlink": 1,
        "mtime": ms,
        "creationTime": ms,
        "size": e.size if e is not None and e.size is not None else (512 if is_dir else 0),
        "mode": mode if mode is not None else (0o755 if is_dir else 0o644),
        "labels": [],
    }


def _visible(scope: Scope | None, site: str, path: str) -> bool:
    """On the reader's scope, or on the way to it (a recursive client walks down to it)."""
    if scope is None or scope.allows(site, path):
        return True
    if scope.sites is not None and site not in scope.sites:
        return False
    return scope.prefixes is not None and any(under(p, path) for p in scope.prefixes)


def _number(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise FilterError("limit and offset must be an integer value.") from None
    if n < 0:
        raise FilterError("limit and offset can not be less than zero.")
    return n


def namespace_endpoint(view: View | None, feed: Feed) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        if view is None:
            return problem(404, "this relay keeps no namespace view")
        try:
            _, scope = feed.authorize(request)
        except AuthError as e:
            return problem(e.status, str(e), feed.auth.challenge if feed.auth else "Bearer")
        try:
            path = normalize_prefix("/" + request.path_params["path"])
            offset, limit = _number(request, "offset"), _number(request, "limit")
        except FilterError as e:
            return problem(400, str(e))
        sites = request.query_params.getlist("site") or None
        if scope is not None and scope.sites is not None:
            sites = sorted(set(sites or scope.sites) & scope.sites)
        found = await view.directory(sites, os.fsencode(path))
        if found.entry is not None:
            site, here = found.entry
        else:
            site, here = found.site, None
        if (found.entry is None and not found.implied) or not _visible(scope, site, path):
            return problem(404, f"No such file or directory {path}")
        body = attributes(site, os.fsencode(path), here)
        wants = request.query_params.get("children", "false").lower() == "true"
        if wants and body["fileType"] == "DIR":
            listed = []
            for key, (child_site, e) in found.children.items():
                name = os.fsdecode(key.rpartition(b"/")[2])
                child = path.rstrip("/") + "/" + name
                if _visible(scope, child_site, child):
                    listed.append({**attributes(child_site, key, e), "fileName": name})
            start = offset or 0
            end = start + limit if limit is not None else None
            body["children"] = listed[start:end]
        return JSONResponse(body)

    return endpoint
