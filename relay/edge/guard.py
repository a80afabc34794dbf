"""What web browsers may make the relay do: Host, Origin and Content-Type checks, as ASGI
middleware in front of every route.

A browser runs any web page's scripts, and those can reach a relay on the visitor's loopback:
WebSockets and form-style POSTs are not subject to CORS, and DNS rebinding gives a foreign page
a host name that resolves to 127.0.0.1. So:

- Host: an anonymous relay on loopback answers to loopback names only (``allowed_hosts``
  widens or, with tokens, sets the list);
- Origin: no browser page publishes, so a WebSocket handshake with an ``Origin`` is refused; a
  write (POST, PUT, PATCH, DELETE) from a page is allowed only from the relay's own origin or
  one in ``cors_origins``;
- Content-Type: a write with a body must say it is JSON (checked where bodies are read, in
  :mod:`.dcache_api`), which a page on another origin cannot send without a CORS preflight that
  the relay does not grant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from storage_events.relay.config import is_loopback

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class Policy:
    hosts: frozenset[str] | None  # host names (lower case, no port) allowed; None: any
    loopback: bool  # loopback names and addresses are allowed too
    origins: frozenset[str]  # web origins whose pages may write (besides the relay's own)

    @classmethod
    def make(
        cls,
        allowed_hosts: Iterable[str],
        cors_origins: Iterable[str],
        *,
        anonymous: bool,
        listen_loopback: bool,
    ) -> Policy:
        hosts = frozenset(h.lower().strip("[]") for h in allowed_hosts)
        guard_hosts = bool(hosts) or (anonymous and listen_loopback)
        return cls(
            hosts if guard_hosts else None,
            anonymous and listen_loopback,
            frozenset(o.rstrip("/") for o in cors_origins),
        )

    def host_problem(self, host_header: str | None) -> str | None:
        if self.hosts is None or host_header is None:  # (HTTP/1.0: no name to rebind)
            return None
        host = _host_name(host_header)
        if host in self.hosts or (self.loopback and is_loopback(host)):
            return None
        return (
            f"this relay does not answer to the name {host_header[:100]!r} (a page "
            "reaching it by another name may be a DNS rebinding attack): use a loopback "
            "address, or add the name to `allowed_hosts` in the relay's config"
        )

    def origin_problem(
        self, kind: str, method: str, origin: str | None, scheme: str, host_header: str | None
    ) -> str | None:
        if origin is None:
            return None  # not a browser page: programs send no Origin
        if kind == "websocket":
            return (
                f"a web page (origin {origin[:100]!r}) may not open the ingest WebSocket: "
                "only agents and relays publish"
            )
        if method not in _WRITES:
            return None
        own = f"{'https' if scheme in ('https', 'wss') else 'http'}://{host_header or ''}"
        if origin.rstrip("/") == own or origin.rstrip("/") in self.origins:
            return None
        return (
            f"a web page from {origin[:100]!r} may not {method} here: add its origin to "
            "`cors_origins` in the relay's config if it is to"
        )


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8808
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Guard:
    """The ASGI middleware applying a :class:`Policy`."""

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    def _problem(self, kind: str, scope: Scope) -> tuple[str | None, int]:
        """Why the request may not go on, and its HTTP status. (Not inline in ``__call__``,
        whose frame lives as long as the connection: a WebSocket's headers would stay too.)"""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self.policy.host_problem(headers.get("host"))
        if problem is not None:
            return problem, 421  # Misdirected Request
        problem = self.policy.origin_problem(
            kind,
            scope.get("method", "GET"),
            headers.get("origin"),
            scope.get("scheme", "http"),
            headers.get("host"),
        )
        return problem, 403

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The app's own coroutine when the request may go on: no frame of the guard's stays
        # alive as long as the connection.
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return self.app(scope, receive, send)
        problem, status = self._problem(kind, scope)
        if problem is None:
            return self.app(scope, receive, send)
        return self._refuse(kind, problem, status, send)

    @staticmethod
    async def _refuse(kind: str, problem: str, status: int, send: Send) -> None:
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": problem[:120]})
            return
        body = (problem + "\n").encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
