"""What the relay tells whom — /healthz, /metrics and /sites with and without tokens — and how
it bounds clients that are slow to send a request, or too many at once."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from pathlib import Path

import httpx
from conftest import Relay, wait_for
from starlette.applications import Starlette
from starlette.routing import Route
from test_auth import ev, publish

from storage_events.relay.auth import Authenticator, TokenConfig
from storage_events.relay.auth import hash_token as h
from storage_events.relay.dcache.api import ChannelService
from storage_events.relay.dcache.channels import Limits, Registry
from storage_events.relay.dcache.store import ChannelStore
from storage_events.relay.feed.endpoint import Feed
from storage_events.relay.feed.hub import Hub
from storage_events.relay.ingest.endpoint import Ingest
from storage_events.relay.ingest.session import IngestLimits
from storage_events.relay.log.sqlite import SQLiteLog
from storage_events.relay.ops.health import health_endpoint
from storage_events.relay.ops.metrics import metrics_endpoint

TOKENS = {
    name: f"secret-{name}-0123456789"
    for name in ("agent-a", "agent-b", "r-all", "r-a", "r-pub", "prom", "kit-relay")
}
ROLES = {  # name: (role, extra TOML lines)
    "agent-a": ("agent", 'site = "a"'),
    "agent-b": ("agent", 'site = "b"'),
    "r-all": ("reader", ""),
    "r-a": ("reader", 'sites = ["a"]'),
    "r-pub": ("reader", 'paths = ["/data/b/public"]'),
    "prom": ("metrics", ""),
    "kit-relay": ("relay", 'site = "kit"'),
}
# Federation links that go nowhere (port 9 is discard): they are listed all the same.
CONFIG = (
    "".join(
        f'[[token]]\nname = "{name}"\nrole = "{role}"\nhash = "{h(TOKENS[name])}"\n{extra}\n\n'
        for name, (role, extra) in ROLES.items()
    )
    + '[[upstream]]\nurl = "http://127.0.0.1:9"\nname = "up"\n\n[[push]]\nurl = "http://127.0.0.1:9"\n'
)
DETAIL = {"status", "version", "relay", "epoch", "head", "first", "subscribers", "agents"}
FEDERATION = {"upstreams", "pushes", "pushing_here", "loops_dropped"}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def relay_with_tokens(tmp_path: Path, procs: list, extra: str = "") -> Relay:
    config = tmp_path / "relay.toml"
    config.write_text(extra + "\n" + CONFIG)
    return Relay(tmp_path, procs, extra=("--config", str(config)), token=TOKENS["r-all"])


def test_with_tokens_healthz_tells_strangers_only_the_status_and_metrics_need_a_metrics_token(
    tmp_path, procs, relay
):
    secured = relay_with_tokens(tmp_path, procs)
    health = secured.url + "/healthz"
    r = httpx.get(health)
    assert r.status_code == 200 and r.json() == {"status": "ok"}  # for load balancers
    for name in TOKENS:  # any valid token, whatever its role, gets the detail
        r = httpx.get(health, headers=bearer(name))
        assert r.status_code == 200 and set(r.json()) == DETAIL, name
    r = httpx.get(health, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "not valid" in r.text
    assert r.headers["www-authenticate"] == "Bearer"

    metrics = secured.url + "/metrics"
    r = httpx.get(metrics)
    assert r.status_code == 401 and "metrics token" in r.text
    for name in ("r-all", "agent-a", "kit-relay"):
        r = httpx.get(metrics, headers=bearer(name))
        assert r.status_code == 403 and "storage-events-relay token --role metrics" in r.text
    r = httpx.get(metrics, headers=bearer("prom"))
    assert r.status_code == 200 and "storage_events_relay_store_ok 1.0" in r.text

    # Without authentication (loopback only) everything stays open, as before.
    r = httpx.get(relay.url + "/healthz")
    assert r.status_code == 200 and set(r.json()) == DETAIL
    assert "storage_events_relay_store_ok 1.0" in httpx.get(relay.url + "/metrics").text


def test_sites_shows_a_restricted_reader_only_what_it_may_read(tmp_path, procs):
    relay = relay_with_tokens(tmp_path, procs)
    assert (
        asyncio.run(
            publish(relay, TOKENS["agent-a"], "a", "n1:a", [ev("a", "n1:a", 1, "/data/a/x")])
        )
        is None
    )
    assert (
        asyncio.run(
            publish(
                relay, TOKENS["agent-b"], "b", "n1:b", [ev("b", "n1:b", 1, "/data/b/private/y")]
            )
        )
        is None
    )

    def sites(name: str) -> dict:
        r = httpx.get(relay.url + "/sites", headers=bearer(name))
        assert r.status_code == 200, r.text
        return r.json()

    everything = sites("r-all")
    assert set(everything) >= FEDERATION and everything["upstreams"][0]["name"] == "up"
    assert [s["site"] for s in everything["sites"]] == ["a", "b"]
    assert all(s["last_event"] is not None for s in everything["sites"])

    site_a = sites("r-a")
    assert not FEDERATION & set(site_a)
    assert [s["site"] for s in site_a["sites"]] == ["a"]
    assert site_a["sites"][0]["last_event"] is not None  # it sees every event of site a

    public = sites("r-pub")  # /data/b/public: b's last event was elsewhere, and so may be a's
    assert not FEDERATION & set(public)
    assert [s["site"] for s in public["sites"]] == ["a", "b"]
    assert not {"last_event", "lag_seconds"} & {k for s in public["sites"] for k in s}


def test_healthz_and_metrics_say_when_the_log_cannot_store(tmp_path):
    log = SQLiteLog(tmp_path / "data", name="r1")
    hub = Hub()
    auth = Authenticator([TokenConfig(name="prom", role="metrics", hash=h("m"))], None)
    ingest = Ingest(log, IngestLimits(), auth, me="r1")
    feed = Feed(log, hub, heartbeat=1, buffer_bytes=1 << 20, auth=auth)
    store = ChannelStore(tmp_path / "data")
    channels = ChannelService(
        Registry(Limits()), store, log, auth, heartbeat=1, buffer_bytes=1 << 20
    )
    app = Starlette(
        routes=[
            Route("/healthz", health_endpoint(log, hub, ingest, auth)),
            Route("/metrics", metrics_endpoint(log, hub, ingest, feed, channels, [], [], auth)),
        ]
    )
    full = "the log cannot store: /srv/data has 0 bytes free; free space there"
    token = {"Authorization": "Bearer m"}

    async def check() -> None:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://relay"
        ) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            ingest.store_error = full
            r = await client.get("/healthz")
            assert r.status_code == 503 and r.json() == {"status": "store_failing"}
            r = await client.get("/healthz", headers=token)
            assert r.status_code == 503
            assert r.json()["status"] == "store_failing" and r.json()["store_error"] == full
            r = await client.get("/metrics", headers=token)
            assert "storage_events_relay_store_ok 0.0" in r.text
            ingest.store_error = None  # it recovered (space was freed)
            r = await client.get("/healthz", headers=token)
            assert r.status_code == 200 and r.json()["status"] == "ok"
            assert "store_error" not in r.json()
            r = await client.get("/metrics", headers=token)
            assert "storage_events_relay_store_ok 1.0" in r.text

    try:
        asyncio.run(check())
    finally:
        store.close()
        asyncio.run(log.close())


HEAD = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
UPGRADE = (
    b"GET /ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


def connect(relay: Relay, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", relay.port))
    s.sendall(data)
    return s


def closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def response_head(s: socket.socket) -> bytes:
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_request_heads_that_stall_are_closed_and_the_relay_keeps_serving(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text("request_head_timeout = 1\n")
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    stalled = [connect(relay, HEAD[: 20 + i % 20]) for i in range(200)]
    stalled.append(connect(relay, UPGRADE))  # a WebSocket upgrade without its last line
    stalled.append(connect(relay))  # nothing at all
    again = connect(relay, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert b" 200 " in response_head(again)
    again.sendall(HEAD)  # a second request on a kept-alive connection, never finished
    stalled.append(again)
    trickle = connect(relay)  # a byte at a time: each one arrives, the head never does
    slowly = itertools.chain(HEAD, itertools.cycle(b"X-Slow: 1\r\n"))
    stalled.append(trickle)
    crlf = connect(relay, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert b" 200 " in response_head(crlf)
    stalled.append(crlf)  # blank lines between requests (the parser skips them) keep it busy

    start = time.monotonic()
    while time.monotonic() - start < 6 and not all(closed_by_server(s) for s in stalled[-3:]):
        assert httpx.get(relay.url + "/healthz", timeout=2).status_code == 200
        for s, data in ((trickle, bytes([next(slowly)])), (crlf, b"\r\n")):
            with contextlib.suppress(OSError):  # closed, as it should be
                s.sendall(data)
        time.sleep(0.2)
    wait_for(
        lambda: all(closed_by_server(s) for s in stalled),
        6 - (time.monotonic() - start),
        f"the server to close all {len(stalled)} stalled connections; open: "
        f"{sum(not closed_by_server(s) for s in stalled)}",
    )
    assert time.monotonic() - start > 0.8  # the timeout, not something sooner
    for s in stalled:
        s.close()
    assert httpx.get(relay.url + "/healthz").json()["status"] == "ok"


def test_beyond_max_connections_the_relay_answers_503_and_recovers(tmp_path, procs):
    config = tmp_path / "relay.toml"
    # The open WebSockets send no hello for the test's few seconds: no timeout must cut them.
    config.write_text("max_connections = 20\nrequest_head_timeout = 60\n")
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    agents = [connect(relay, UPGRADE + b"\r\n") for _ in range(8)]
    for s in agents:
        assert b" 101 " in response_head(s).split(b"\r\n", 1)[0]
    subscribers = [connect(relay, HEAD + b"\r\n") for _ in range(12)]
    for s in subscribers:  # the 20th connection too: all 20 are served
        assert b" 200 " in response_head(s).split(b"\r\n", 1)[0]

    r = httpx.get(relay.url + "/healthz", timeout=5)
    assert r.status_code == 503
    one_more = connect(relay, UPGRADE + b"\r\n")  # WebSocket upgrades count the same
    assert b" 503 " in response_head(one_more).split(b"\r\n", 1)[0]
    one_more.close()

    for s in subscribers[:3] + agents[:2]:
        s.close()
    wait_for(
        lambda: httpx.get(relay.url + "/healthz", timeout=5).status_code == 200,
        10,
        "the relay to serve again once connections closed",
    )
    for s in subscribers[3:] + agents[2:]:
        s.close()


def test_a_request_head_beyond_64_kib_is_refused_and_bodies_are_not_counted(tmp_path, procs):
    relay = Relay(tmp_path, procs)
    # One send, and nothing after it: a server closing with unread data would reset the
    # connection, and the answer with it.
    huge = connect(relay, HEAD + b"X-Pad: " + b"p" * 70_000 + b"\r\n")
    assert b" 431 " in response_head(huge)
    wait_for(lambda: closed_by_server(huge), 5, "the relay to close it")
    huge.close()
    # A head of a few hundred bytes with a body far larger than 64 KiB: the body is not head.
    body = b'{"path": "/' + b"d" * 100_000 + b'"}'
    r = httpx.post(
        relay.url + "/api/v1/events/channels",
        content=body,
        timeout=5,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text  # the dCache API's own limit on bodies answers
    assert httpx.get(relay.url + "/healthz", timeout=2).status_code == 200
