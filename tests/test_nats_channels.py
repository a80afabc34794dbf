"""dCache channels on a NATS store, shared by its replicas: a channel made on one replica is
streamed and resumed on another with the same ids, survives the SIGKILL of the replica holding
the channels, and a request that no holder can answer is refused clearly. Real relays on a real
three-server JetStream cluster, a real agent, real HTTP and SSE clients; and the pieces that need
no socket (the lease's timing, the forwarding of a request) on their own."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import httpx
import nats
import pytest
from conftest import ChannelReader, NatsCluster, Proc, Relay, start_agent, wait_for
from starlette.requests import Request
from starlette.responses import Response
from test_channels import Log
from test_nats_store import relay_on

from storage_events.relay.dcache import forward
from storage_events.relay.dcache.channels import Limits, Registry, Selector
from storage_events.relay.dcache.lease import MARGIN, RENEW, TRY, TTL, Lease
from storage_events.relay.dcache.nats_store import Fenced, NATSChannelStore
from storage_events.relay.dcache.store import saved, snapshot
from storage_events.relay.feed.filters import Scope
from storage_events.relay.log.base import StoreError
from storage_events.relay.log.nats import NATSLog

API = "/api/v1/events"


@pytest.fixture
def cluster(tmp_path: Path, procs: list[Proc]) -> NatsCluster:
    return NatsCluster(tmp_path, procs)


# -- without sockets ---------------------------------------------------------------------------


def test_a_holder_stops_before_its_lease_can_expire_and_retries_in_time():
    lease = Lease()
    assert not lease.holds(0.0) and lease.wait(0.0) == TRY
    lease.wrote(7, at=100.0)
    assert lease.holds(100.0) and lease.wait(100.0) == RENEW
    # Renewals failing: the last chance to renew comes before it must stop, MARGIN seconds
    # before the server can let the key expire and another replica take it.
    assert lease.wait(100.0 + TTL - MARGIN - 1.0) == 1.0
    assert lease.holds(100.0 + TTL - MARGIN - 0.01)
    assert not lease.holds(100.0 + TTL - MARGIN)
    assert lease.wait(100.0 + TTL) == 0.0
    lease.lost()
    assert not lease.holds(100.0) and lease.wait(100.0) == TRY


def test_a_forwarded_request_is_answered_as_the_client_sent_it():
    body = b'{"path": "/d"}'

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    asked = Request(
        {
            "type": "http",
            "method": "POST",
            "scheme": "https",
            "path": "/api/v1/events/channels/c1/subscriptions/inotify",
            "root_path": "",
            "query_string": b"access_token=t",
            "headers": [
                (b"host", b"replica-b.example:8808"),
                (b"authorization", b"Bearer xyz"),
                (b"content-type", b"application/json"),
                (b"cookie", b"session=secret"),  # not the holder's business
            ],
            "client": ("192.0.2.1", 5555),
            "server": ("10.0.0.2", 8808),
        },
        receive,
    )

    async def roundtrip() -> tuple[forward.Forwarded, Request]:
        fwd = forward.decode_request(
            forward.encode(await forward.forwarded(asked, 4, {"x-extra": "1"}))
        )
        return fwd, forward.request(forward.scope(fwd), fwd.body)

    fwd, there = asyncio.run(roundtrip())
    assert str(there.base_url) == "https://replica-b.example:8808/"  # the replica asked
    assert there.url.path == asked.url.path and there.query_params["access_token"] == "t"
    assert there.headers["authorization"] == "Bearer xyz"
    assert there.headers["content-type"] == "application/json"
    assert there.headers["x-extra"] == "1" and "cookie" not in there.headers
    assert fwd.body == body[:5]  # one byte past the limit: enough to be refused as too large

    listing = b'["' + b'", "'.join(
        b"https://b/api/v1/events/channels/c/%d" % i for i in range(9999)
    )
    for sent in (
        Response(status_code=201, headers={"Location": "https://replica-b.example:8808/x"}),
        Response(listing + b'"]', media_type="application/json"),
    ):
        a = forward.decode_answer(forward.encode(forward.answer(sent)))
        got = forward.response(a)
        assert a.compressed == (len(sent.body) >= forward.COMPRESS)
        assert (got.status_code, got.body) == (sent.status_code, sent.body)
        assert {k: v for k, v in got.headers.items()} == dict(sent.headers.items())


# -- the store on a real cluster, in-process ----------------------------------------------------


def test_writes_cut_short_are_finished_or_redone_once_and_an_old_holder_is_fenced(cluster):
    """A holder dies after its commit, before the rows' own keys: the next one loads the whole
    write. One dies after publishing a batch's events, before its commit: the next one routes
    the batch again, to the same ids, and JetStream keeps each event once. A holder that lost
    the lease without noticing can no longer write. A backlog is trimmed to its limit."""

    async def main() -> None:
        log = NATSLog(cluster.urls, name="t", stream="CUT")
        await log.start()
        try:

            async def holder(backlog: int = 100) -> tuple[NATSChannelStore, Registry]:
                store, reg = NATSChannelStore(log), Registry(Limits(backlog=backlog))
                await store.start(TTL)
                await store.load(reg, time.time())
                return store, reg

            ev = Log()
            records = [ev(f"/d/{i}", "IN_CREATE") for i in range(14)]

            async def route(store: NATSChannelStore, reg: Registry, upto: int) -> None:
                (ch,) = reg.channels.values()
                routed = reg.route(records[store._cursor : upto])
                reg.trimmed(ch)
                snap = snapshot(ch)
                rows = [(c.id, i, d, o) for c, i, d, o in routed.events]
                await store.write([snap], upto, rows, None, [])
                saved(ch, snap)

            async def dies(*args: object) -> None:
                raise ConnectionError("killed")

            first, reg = await holder()
            ch = reg.create("u", Scope(), None, "https://r/api/v1/events/channels", 0.0)
            w, _ = reg.subscribe(ch, Selector("/d"))
            await route(first, reg, 3)
            first._apply = dies  # type: ignore[method-assign]
            reg.subscribe(ch, Selector("/d", ["IN_CREATE", "IN_DELETE"]))  # changed, in this write
            with pytest.raises(ConnectionError):
                await route(first, reg, 7)
            with pytest.raises(StoreError, match="loaded again"):
                await first.write([snapshot(ch)], 7)

            second, reg = await holder()
            back = reg.channels[ch.id]
            assert back.next_id == 7
            assert back.watches[w.sid].selector.flags == ["IN_CREATE", "IN_DELETE"]
            second._commit = dies  # type: ignore[method-assign]
            with pytest.raises(ConnectionError):
                await route(second, reg, 10)  # events 7, 8, 9 are published, not committed

            third, reg = await holder()
            assert reg.channels[ch.id].next_id == 7
            await route(third, reg, 12)
            assert [i for i, *_ in await third.fetch(ch.id, -1, 100)] == list(range(12))
            assert (await log.client.jetstream().stream_info(third.events)).state.messages == 12
            fourth, reg = await holder(backlog=5)  # the lease went to another: third missed it
            with pytest.raises(Fenced):
                await third.write([snapshot(reg.channels[ch.id])], 12)
            await route(fourth, reg, 14)
            assert reg.channels[ch.id].first_id == 9
            assert [i for i, *_ in await fourth.fetch(ch.id, -1, 100)] == list(range(9, 14))
            assert [i for i, *_ in await fourth.fetch(ch.id, 10, 2)] == [11, 12]
        finally:
            await log.close()

    asyncio.run(main())


# -- relays ------------------------------------------------------------------------------------


def write(path: Path) -> None:
    path.write_bytes(b"x")


def holding(relay: Relay) -> bool:
    """Whether the relay answers channel requests (some replica holds the channels)."""
    return httpx.get(relay.url + API + "/channels", timeout=5).status_code == 200


def watching(path: Path) -> dict:
    return {"path": str(path), "flags": ["IN_CLOSE_WRITE"]}  # one event a file


def names(messages: list[tuple[str, str | None, dict]]) -> list[tuple[int, str]]:
    return [(int(i), d["event"]["name"]) for kind, i, d in messages if kind == "inotify" and i]


def test_a_channel_made_on_one_replica_is_streamed_and_resumed_on_another(tmp_path, procs, cluster):
    a = relay_on(tmp_path, procs, cluster, "a")
    wait_for(lambda: holding(a), 15, "relay a to hold the channels")
    b = relay_on(tmp_path, procs, cluster, "b")
    inbox, outbox = tmp_path / "w" / "in", tmp_path / "w" / "out"
    inbox.mkdir(parents=True)
    outbox.mkdir()
    start_agent(tmp_path, procs, b.url, tmp_path / "w")
    http = httpx.Client(timeout=10)

    r = http.post(a.url + API + "/channels")
    assert r.status_code == 201
    channel = r.headers["location"]
    assert channel.startswith(a.url + API + "/channels/")
    on_b = channel.replace(a.url, b.url)
    made_on_b = http.post(b.url + API + "/channels").headers["location"]
    assert made_on_b.startswith(b.url + API + "/channels/")  # named as the client asked
    # Listed as dCache lists them: under the name this request used, wherever they were made.
    assert sorted(http.get(b.url + API + "/channels").json()) == sorted([on_b, made_on_b])
    r = http.post(channel + "/subscriptions/inotify", json=watching(inbox))
    assert r.status_code == 201
    sub_in = r.headers["location"]
    assert http.get(on_b + "/subscriptions").json() == [sub_in]

    reader = ChannelReader(on_b)
    assert reader.status == 200
    for i in range(5):
        write(inbox / f"f{i}")
    wait_for(lambda: len(names(reader.messages())) >= 5, 20, "5 events on b")
    assert names(reader.messages()) == [(i, f"f{i}") for i in range(5)]
    assert {d["subscription"] for _, _, d in reader.messages()} == {sub_in}

    # Away, then back on the other replica from the last id seen: nothing twice, nothing lost.
    reader.stop()
    for i in range(5, 8):
        write(inbox / f"f{i}")
    back = ChannelReader(channel, last_event_id="4")
    back.wait(3)
    time.sleep(1)  # (a repeat would be here by now)
    assert names(back.messages()) == [(i, f"f{i}") for i in range(5, 8)]

    # A watch added through b is the holder's (a's) at once: announced, then effective.
    r = http.post(on_b + "/subscriptions/inotify", json=watching(outbox))
    assert r.status_code == 201
    sub_out = r.headers["location"]
    write(outbox / "g")
    assert back.wait(5)[3:] == [
        ("SYSTEM", None, {"type": "NEW_SUBSCRIPTION", "subscription": sub_out}),
        (
            "inotify",
            "8",
            {"event": {"mask": ["IN_CLOSE_WRITE"], "name": "g"}, "subscription": sub_out},
        ),
    ]
    # The newest client wins, whichever replica each is on.
    newest = ChannelReader(on_b, last_event_id="8")
    assert back.wait(6)[-1] == ("SYSTEM", None, {"type": "COMPETING_CLIENT"})
    assert back.ended.wait(5)
    assert http.delete(sub_out.replace(a.url, b.url)).status_code == 204
    assert newest.wait(2) == [
        ("inotify", "9", {"event": {"mask": ["IN_IGNORED"]}, "subscription": sub_out}),
        ("SYSTEM", None, {"type": "SUBSCRIPTION_CLOSED", "subscription": sub_out}),
    ]

    # A channel whose client is connected does not expire, wherever the client is; when the
    # client's replica dies, the holder stops counting it as connected within ~15 s.
    assert http.patch(channel, json={"timeout": 1}).status_code == 204
    time.sleep(4)
    assert http.get(channel).status_code == 200
    b.kill()
    died = time.monotonic()
    wait_for(lambda: http.get(channel).status_code == 404, 25, "the channel to expire on a")
    assert 10 < time.monotonic() - died < 20


def test_the_channels_survive_the_death_of_the_replica_holding_them(tmp_path, procs, cluster):
    a = relay_on(tmp_path, procs, cluster, "a")
    wait_for(lambda: holding(a), 15, "relay a to hold the channels")
    b = relay_on(tmp_path, procs, cluster, "b")
    inbox = tmp_path / "w"
    inbox.mkdir()
    start_agent(tmp_path, procs, b.url, inbox)
    http = httpx.Client(timeout=15)
    channel = http.post(a.url + API + "/channels").headers["location"]
    assert http.post(channel + "/subscriptions/inotify", json=watching(inbox)).is_success
    reader = ChannelReader(channel)

    # Files keep coming while a, holding the channels and serving the reader, is killed.
    stop = threading.Event()
    written: list[str] = []

    def writing() -> None:
        while not stop.is_set():
            name = f"f{len(written):03d}"
            write(inbox / name)
            written.append(name)
            time.sleep(0.05)

    writer = threading.Thread(target=writing, daemon=True)
    writer.start()
    try:
        wait_for(lambda: len(names(reader.messages())) >= 20, 20, "20 events on a")
        a.kill()
        killed = time.monotonic()
        before = len(written)
        reader.ended.wait(5)
        # Until b takes the channels over, nobody answers for them: refused, and said why.
        r = http.get(b.url + API + "/channels")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["status"] == "503" and "dCache channels" in r.json()["detail"]
        seen = names(reader.messages())
        last = seen[-1][0]

        def resumed() -> ChannelReader | None:
            again = ChannelReader(channel.replace(a.url, b.url), last_event_id=str(last))
            return again if again.status == 200 else None

        again = wait_for(resumed, 25, "b to take the channels over")
        took = time.monotonic() - killed
        time.sleep(1)
    finally:
        stop.set()
        writer.join()
    assert took < 20, f"b took {took:.1f} s to take over"
    after = written[before:]
    # Every file written from the kill on, each event once, the ids going on from the last seen.
    wait_for(
        lambda: {n for _, n in names(again.messages())} >= set(after),
        20,
        "every file written after the kill",
    )
    time.sleep(1)
    resumed_events = names(again.messages())
    ids = [i for i, _ in resumed_events]
    assert ids == list(range(last + 1, last + 1 + len(ids)))
    assert [n for _, n in seen + resumed_events] == written  # every file once, in order
    assert http.get(channel.replace(a.url, b.url)).json() == {"timeout": 300}
    again.stop()


def test_without_a_holder_requests_are_refused_and_unknown_channels_are_404_everywhere(
    tmp_path, procs, cluster
):
    """Something else squats the lease: no relay holds the channels, and every replica says so
    at once instead of hanging. Once it is free, one takes over, and an id that is not a
    channel is 404 on each replica."""
    squat, free = threading.Event(), threading.Event()

    async def squatter() -> None:
        nc = await nats.connect(cluster.urls)
        js = nc.jetstream()
        for _ in range(40):  # (a cluster that just started may not place a bucket yet)
            with contextlib.suppress(nats.errors.Error):
                kv = await js.create_key_value(
                    bucket="STORAGE_EVENTS_CHANNELS_LEASE", ttl=TTL, replicas=3
                )
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError("JetStream made no lease bucket for the squatter within 20 s")
        revision = await kv.create("holder", b"squatter")
        squat.set()
        while not free.is_set():
            await asyncio.sleep(1)
            revision = await kv.update("holder", b"squatter", last=revision)
        await kv.delete("holder")
        await nc.close()

    thread = threading.Thread(target=asyncio.run, args=(squatter(),), daemon=True)
    thread.start()
    assert squat.wait(20)
    try:
        a = relay_on(tmp_path, procs, cluster, "a")
        b = relay_on(tmp_path, procs, cluster, "b")
        time.sleep(2 * TRY)  # (they would have taken a free lease by now)
        for relay in (a, b):
            for method, path in (("POST", "/channels"), ("GET", "/channels/nope")):
                r = httpx.request(method, relay.url + API + path, timeout=15)
                assert r.status_code == 503, (relay.name, path, r.text)
                assert r.json()["title"] == "Service Unavailable"
                assert r.json()["detail"].startswith(
                    "no relay holds the dCache channels at the moment"
                )
            refused = ChannelReader(relay.url + API + "/channels/nope")
            assert refused.status == 503
    finally:
        free.set()
        thread.join(20)
    wait_for(lambda: holding(a) and holding(b), 15, "a relay to take the channels over")
    for relay in (a, b):
        for r in (
            httpx.get(relay.url + API + "/channels/nope", timeout=10),
            httpx.get(
                relay.url + API + "/channels/nope",
                headers={"Accept": "text/event-stream"},
                timeout=10,
            ),
            httpx.delete(relay.url + API + "/channels/nope", timeout=10),
        ):
            assert r.status_code == 404, (relay.name, r.text)
            assert r.json()["status"] == "404" and "no channel 'nope'" in r.json()["detail"]
        r = httpx.post(
            relay.url + API + "/channels",
            content=b"{" + b" " * 70_000 + b"}",
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert r.status_code == 413, r.text  # refused by the holder, not carried whole
