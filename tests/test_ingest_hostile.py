"""The relay's ingest against hostile peers: unauthenticated floods, forged streams and seq
jumps with valid tokens, fields out of range or not canonical, web pages in a real browser, and
a data directory that fills up."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import subprocess
import threading
import time

import httpx
import msgspec
import pytest
import websockets
from browser import Browser
from conftest import Relay, Tail, start_agent, wait_for

from storage_events.client import subscribe
from storage_events.relay.auth import hash_token
from storage_events.relay.ingest.session import (
    IngestLimits,
    IngestSession,
    ProtocolError,
    check_relayed,
)
from storage_events.relay.log.admission import Owner, admit
from storage_events.wire import (
    Ack,
    Batch,
    Error,
    Event,
    Hello,
    Welcome,
    decode_to_agent,
    encode_frame,
    event_problem,
)


def ev(
    seq: int,
    stream: str = "n1:run",
    site: str = "kit",
    node: str = "n1",
    path: str = "/data/f",
    **kw: object,
) -> Event:
    return Event(
        site=site,
        node=node,
        path=path,
        flags=kw.pop("flags", ["IN_CLOSE_WRITE"]),
        ts=1,
        stream=stream,
        seq=seq,
        **kw,
    )


def relayed(seq: int, id: int, sender: str = "kit", **kw: object) -> Event:
    return ev(seq, id=id, via=kw.pop("via", [sender]), origin_id=kw.pop("origin_id", id), **kw)


# -- pure: the session and the admission rule --------------------------------------------------


def test_nothing_large_is_decoded_before_the_hello():
    session = IngestSession(IngestLimits())
    # 16 MiB that would take seconds to decode as a batch, cut so that decoding it would fail
    # differently: the size alone refuses it.
    frame = encode_frame(Batch([ev(i) for i in range(1, 200_000)]))[: 16 * 2**20]
    with pytest.raises(ProtocolError, match="first frame must be a hello of at most") as e:
        session.receive(frame)
    assert e.value.code == 1009


def test_an_agent_names_a_stream_of_its_own_node():
    for node, stream in (("n2", "n1:run"), ("kit.gap", "kit.gap"), ("n1", "n1:")):
        with pytest.raises(ProtocolError, match="an agent's stream is <its node>:<run id>"):
            IngestSession(IngestLimits()).receive(
                encode_frame(Hello(site="kit", node=node, stream=stream))
            )


def test_an_agent_batch_that_skips_seqs_is_refused_and_acks_never_pass_what_it_sent():
    session = IngestSession(IngestLimits())
    session.receive(encode_frame(Hello(site="kit", node="n1", stream="n1:run")))
    with pytest.raises(ProtocolError, match="go up by one"):
        session.receive(encode_frame(Batch([ev(1), ev(10**12)])))
    session = IngestSession(IngestLimits())
    session.receive(encode_frame(Hello(site="kit", node="n1", stream="n1:run")))
    session.receive(encode_frame(Batch([ev(1), ev(2)])))
    assert session.ack(10**12) == 2  # whatever the log holds, this agent sent up to 2


def test_a_jump_in_an_agents_stream_is_announced_as_loss():
    taken = admit(
        [ev(8), ev(9)], {"n1:run": 5}, {"n1:run": Owner("kit", "n1", True)}, relayed=False
    )
    notice, *rest = taken.events
    assert notice.flags == ["IN_Q_OVERFLOW"] and notice.path == "/" and notice.seq == 7
    assert [e.seq for e in rest] == [8, 9] and taken.jumps == [("n1:run", 5, 8)]
    # Relayed streams may skip (a pulling relay may see only some paths): no notice there.
    taken = admit(
        [relayed(8, 1)], {"n1:run": 5}, {"n1:run": Owner("kit", "n1", False)}, relayed=True
    )
    assert [e.seq for e in taken.events] == [8]


def test_no_one_else_writes_an_agents_stream():
    held = {"n1:run": 5}
    owners = {"n1:run": Owner("kit", "n1", True)}
    # A relay with a token for the site jumping the agent's stream: refused, position kept.
    taken = admit([relayed(10**12, 1)], held, owners, relayed=True)
    assert not taken.events and "published here by its own agent" in taken.refused[0][1]
    # Another node of the site.
    taken = admit([ev(6, node="n2")], held, owners, relayed=False)
    assert not taken.events and "belongs to kit/n1" in taken.refused[0][1]
    # And a stream that arrives by federation is not an agent's to take over.
    taken = admit([ev(6)], held, {"n1:run": Owner("kit", "n1", False)}, relayed=False)
    assert not taken.events and "through federation" in taken.refused[0][1]


def test_gap_streams_hold_only_their_relays_loss_notices():
    ordinary = relayed(1, 1, site="kit", node="kit", stream="kit.gap")
    with pytest.raises(ProtocolError, match="holds only that relay's loss notices"):
        check_relayed([ordinary], 0, "kit", frozenset({"kitsite"}))
    notice = relayed(
        1,
        1,
        site="kit",
        node="kit",
        stream="kit.gap",
        path="/",
        flags=["IN_Q_OVERFLOW"],
        is_dir=True,
    )
    assert check_relayed([notice], 0, "kit", frozenset({"kitsite"})) == 1


def test_relayed_provenance_is_checked():
    for bad, why in (
        (relayed(1, 5, origin_id=3), "must be its id 5"),
        (relayed(1, 5, via=["up", "kit", "up", "kit"]), "names a relay twice"),
        (relayed(1, 5, via=["up"]), "must end with the pushing relay"),
        (relayed(1, 5, via=[], origin_id=None), "names the relays it passed"),
    ):
        with pytest.raises(ProtocolError, match=why):
            check_relayed([bad], 0, "kit", frozenset({"kit"}))


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (ev(1, path="data/rel"), "canonical absolute"),
        (ev(1, path="/data/public/../secret/dotdot"), "canonical absolute"),
        (ev(1, path="/data//x"), "canonical absolute"),
        (ev(1, path="/data/x/"), "canonical absolute"),
        (ev(1, path="/data/x", old_path="/data/./y"), "old_path"),
        (ev(1, path="/data/x", old_path="/a\0b"), "NUL"),
        (ev(1, path="/data/x", old_path="/" + "o" * 8 * 2**20), "old_path is 8,388,609"),
        (ev(1, path="/data/\ufffd", raw_path=b"/secret/\xff"), "raw_path is not the bytes"),
        (ev(1, path="/data/x", raw_path=b"/data/x"), "raw_path is not the bytes"),
        (ev(1, flags=["IN_CREATE", "IN_CREATE"]), "twice"),
    ],
)
def test_fields_must_be_canonical_and_bounded(event, why):
    assert why in (event_problem(event) or "")


def test_numbers_and_lists_beyond_their_range_are_refused_with_a_reason():
    session = IngestSession(IngestLimits())
    session.receive(encode_frame(Hello(site="kit", node="n1", stream="n1:run")))
    for event, why in (
        (ev(2**63), "seq"),
        (ev(1, id=2**64 - 1), "id"),
        (ev(1, flags=["IN_CREATE"] * 500_000), "flags"),
        (ev(1, via=["kit\n2026-12-01 CRITICAL forged"]), "via"),
    ):
        with pytest.raises(ProtocolError, match=why) as e:
            session.receive(msgspec.msgpack.encode(Batch([event])))
        assert e.value.code == 1007


# -- a real relay with tokens ---------------------------------------------------------------

TOKENS = {
    "agent-kit": "t-agent-kit",
    "agent-n2": "t-agent-n2",
    "agent-evil": "t-agent-evil",
    "relay-kit": "t-relay-kit",
    "relay-any": "t-relay-any",
    "reader": "t-reader",
}
CONFIG = f"""
[[token]]
name = "agent-kit"
role = "agent"
site = "kit"
hash = "{hash_token(TOKENS["agent-kit"])}"

[[token]]
name = "agent-n2"
role = "agent"
site = "kit"
node = "n2"
hash = "{hash_token(TOKENS["agent-n2"])}"

[[token]]
name = "agent-evil"
role = "agent"
site = "evil"
hash = "{hash_token(TOKENS["agent-evil"])}"

[[token]]
name = "relay-kit"
role = "relay"
site = "kitrelay"
hash = "{hash_token(TOKENS["relay-kit"])}"

[[token]]
name = "relay-any"
role = "relay"
site = "other"
sites = ["kit"]
hash = "{hash_token(TOKENS["relay-any"])}"

[[token]]
name = "reader"
role = "reader"
hash = "{hash_token(TOKENS["reader"])}"
"""


def ws_url(relay: Relay) -> str:
    return relay.url.replace("http://", "ws://") + "/ingest"


async def exchange(
    relay: Relay, hello: Hello, *batches: list[Event], eager: bool = False
) -> list[object]:
    """What the relay answers to a hello and batches (until it closes); ``eager``: the batches
    are sent at once, not each after the previous answer."""
    replies: list[object] = []
    async with websockets.connect(ws_url(relay), max_size=None) as ws:
        await ws.send(encode_frame(hello))
        for batch in batches if eager else ():
            await ws.send(msgspec.msgpack.encode(Batch(batch)))
        with contextlib.suppress(websockets.ConnectionClosed):
            replies.append(decode_to_agent(await ws.recv()))
            for batch in batches:
                if not eager:
                    await ws.send(msgspec.msgpack.encode(Batch(batch)))
                replies.append(decode_to_agent(await asyncio.wait_for(ws.recv(), 10)))
    return replies


@pytest.fixture
def token_relay(tmp_path, procs) -> Relay:
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    return Relay(tmp_path, procs, extra=("--config", str(config)), token=TOKENS["reader"])


def test_valid_tokens_cannot_silence_an_agents_stream(tmp_path, procs, token_relay):
    relay = token_relay
    root = tmp_path / "w"
    root.mkdir()
    agent = start_agent(
        tmp_path,
        procs,
        relay.url,
        root,
        site="kit",
        node="n1",
        extra=("--token", TOKENS["agent-kit"]),
    )
    tail = Tail(tmp_path, procs, relay.url, "--since", "earliest", "--token", TOKENS["reader"])
    (root / "before").write_bytes(b"x")
    tail.wait_count(2)  # its create and close
    stream = tail.events()[0]["stream"]

    # The README's relay token (no `sites`): only its own name's events.
    got = asyncio.run(
        exchange(
            relay,
            Hello(
                role="relay",
                site="kitrelay",
                node="kitrelay",
                stream="relay:kitrelay:1",
                token=TOKENS["relay-kit"],
            ),
            [relayed(10**12, 1, sender="kitrelay", stream=stream)],
        )
    )
    assert isinstance(got[-1], Error) and "may not push events of site 'kit'" in got[-1].message
    # A relay allowed the site: the agent's stream is not its to write.
    got = asyncio.run(
        exchange(
            relay,
            Hello(
                role="relay",
                site="other",
                node="other",
                stream="relay:other:1",
                token=TOKENS["relay-any"],
            ),
            [relayed(10**12, 1, sender="other", stream=stream)],
        )
    )
    assert isinstance(got[-1], Ack)
    # Another site's agent naming the stream (every event shows it): refused, and the agent
    # publishing it is not disturbed.
    got = asyncio.run(
        exchange(relay, Hello(site="evil", node="n1", stream=stream, token=TOKENS["agent-evil"]))
    )
    assert isinstance(got[0], Error) and "belongs to kit/n1" in got[0].message
    assert "takes over" not in relay.proc.output()
    # A node's own token as another node; another node's stream under its own name.
    got = asyncio.run(
        exchange(relay, Hello(site="kit", node="n1", stream=stream, token=TOKENS["agent-n2"]))
    )
    assert isinstance(got[0], Error) and "may publish as node 'n2'" in got[0].message
    got = asyncio.run(
        exchange(relay, Hello(site="kit", node="n2", stream=stream, token=TOKENS["agent-n2"]))
    )
    assert isinstance(got[0], Error) and "<its node>:<run id>" in got[0].message
    # The site's shared token on the stream takes it over (a reconnecting agent does that)
    # but acknowledges nothing to the connection it replaced; the agent comes back.
    got = asyncio.run(
        exchange(relay, Hello(site="kit", node="n1", stream=stream, token=TOKENS["agent-kit"]))
    )
    assert isinstance(got[0], Welcome)

    for i in range(20):
        (root / f"after-{i}").write_bytes(b"x")
    events = tail.wait_count(2 + 40)
    closes = sorted(e["path"].rsplit("/", 1)[1] for e in events if e["flags"] == ["IN_CLOSE_WRITE"])
    assert closes == sorted(["before", *(f"after-{i}" for i in range(20))])
    assert {e["seq"] for e in events} == set(range(1, 43))  # nothing forged got in
    assert "dropped events of stream" in relay.proc.output()
    assert agent.popen.poll() is None


def test_a_forged_seq_jump_is_refused_with_an_error_frame(token_relay):
    hello = Hello(site="kit", node="n1", stream="n1:jump", token=TOKENS["agent-kit"])
    got = asyncio.run(
        exchange(token_relay, hello, [ev(1, stream="n1:jump")], [ev(2**63, stream="n1:jump")])
    )
    assert isinstance(got[0], Welcome) and got[1] == Ack("n1:jump", 1)
    assert isinstance(got[2], Error) and "seq" in got[2].message
    # After a hole the agent resumes (its relay lost events): stored, with the loss announced.
    got = asyncio.run(exchange(token_relay, hello, [ev(5, stream="n1:jump")]))
    assert got == [Welcome(stream="n1:jump", acked=1), Ack("n1:jump", 5)]
    seen = []
    for item in subscribe(token_relay.url, since="earliest", token=TOKENS["reader"]):
        seen.append(item.event)
        if len(seen) == 3:
            break
    assert [(e.seq, e.flags) for e in seen] == [
        (1, ["IN_CLOSE_WRITE"]),
        (4, ["IN_Q_OVERFLOW"]),
        (5, ["IN_CLOSE_WRITE"]),
    ]


def test_unauthenticated_floods_are_refused_before_reading_them(token_relay):
    async def flood() -> list[tuple[int | None, str]]:
        frame = encode_frame(Batch([ev(i) for i in range(1, 80_000)]))
        assert 10 * 2**20 < len(frame) < 16 * 2**20  # within the relay's frame limit

        async def one() -> tuple[int | None, str]:
            async with websockets.connect(ws_url(token_relay), max_size=None) as ws:
                with contextlib.suppress(websockets.ConnectionClosed, OSError):
                    await ws.send(frame)
                    await ws.recv()
            return ws.close_code, ws.close_reason or ""

        return await asyncio.gather(*(one() for _ in range(4)))

    for code, reason in asyncio.run(flood()):
        # Refused from the frame's header: the relay read 16 KiB of it at most.
        assert code in (1009, 1006), (code, reason)
        assert code == 1006 or "exceeds limit of 16384 bytes" in reason
    # A hello of the right size is read and answered, and a large batch sent right after it
    # (an agent does not wait for the welcome to be read) is taken.
    hello = Hello(site="kit", node="n1", stream="n1:x", token=TOKENS["agent-kit"])
    batch = [ev(i, stream="n1:x", path=f"/data/{'d' * 200}/f{i}") for i in range(1, 2001)]
    assert len(encode_frame(Batch(batch))) > 256 * 1024
    got = asyncio.run(exchange(token_relay, hello, batch, eager=True))
    assert got == [Welcome(stream="n1:x", acked=0), Ack("n1:x", 2000)]


# -- web pages in a real browser, and DNS rebinding -----------------------------------------

ATTACK = """<!doctype html><script>
window.result = {ws: "pending", posts: []};
const relay = "%(relay)s";
const ws = new WebSocket(relay.replace("http", "ws") + "/ingest");
ws.onopen = () => { window.result.ws = "open"; };
ws.onerror = () => { window.result.ws = "refused"; };
for (let i = 0; i < 130; i++) {
  fetch(relay + "/api/v1/events/channels", {method: "POST", mode: "no-cors",
        headers: {"Content-Type": "text/plain"}, body: "{}"})
    .then(() => window.result.posts.push("sent"), () => window.result.posts.push("failed"));
}
</script>"""


def test_web_pages_and_foreign_host_names_cannot_drive_the_anonymous_relay(tmp_path, procs, relay):
    page = (ATTACK % {"relay": relay.url}).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = Browser(tmp_path, procs)
    try:
        browser.goto(f"http://127.0.0.2:{server.server_address[1]}/")
        wait_for(
            lambda: (
                browser.js("window.result && window.result.ws") == "refused"
                and len(browser.js("window.result.posts")) == 130
            ),
            30,
            "the attacking page to finish",
        )
    finally:
        browser.close()
        server.shutdown()
    assert relay.healthy()["head"] == 0
    assert httpx.get(relay.url + "/api/v1/events/channels", timeout=5).json() == []
    assert httpx.post(relay.url + "/api/v1/events/channels", timeout=5).status_code == 201
    # DNS rebinding: the right address, someone else's name.
    r = httpx.get(relay.url + "/events", headers={"Host": "attacker.example"}, timeout=5)
    assert r.status_code == 421 and "allowed_hosts" in r.text
    assert (
        httpx.get(
            relay.url + "/healthz", headers={"Host": f"localhost:{relay.port}"}, timeout=5
        ).status_code
        == 200
    )
    # A JSON body sent as a form: refused; as JSON: taken.
    ch = httpx.post(relay.url + "/api/v1/events/channels", timeout=5).headers["location"]
    body = '{"path": "/data"}'
    assert (
        httpx.post(
            ch + "/subscriptions/inotify",
            content=body,
            timeout=5,
            headers={"Content-Type": "text/plain"},
        ).status_code
        == 415
    )
    assert (
        httpx.post(
            ch + "/subscriptions/inotify",
            content=body,
            timeout=5,
            headers={"Content-Type": "application/json"},
        ).status_code
        == 201
    )


# -- a data directory that fills up ---------------------------------------------------------


def test_a_full_data_directory_holds_senders_back_and_recovers(tmp_path, procs):
    data = tmp_path / "small"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)], check=True)
    try:
        relay = Relay(tmp_path, procs, extra=("--data", str(data / "relay")))
        filler = data / "filler"
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], stderr=subprocess.DEVNULL, check=False
        )  # fills it up (exit 1: ENOSPC)
        root = tmp_path / "w"
        root.mkdir()
        agent = start_agent(tmp_path, procs, relay.url, root)
        for i in range(1000):
            (root / f"f{i}").write_bytes(b"x")
        wait_for(
            lambda: "cannot write the event log" in relay.proc.output(),
            30,
            "the relay to say it cannot store",
        )
        health = httpx.get(relay.url + "/healthz", timeout=5)
        assert health.status_code == 503 and "MiB free" in health.json()["store_error"]
        time.sleep(3)  # the agent is held back, not dropped and reconnecting
        assert agent.output().count("connected to") == 1, agent.output()[-3000:]
        filler.unlink()
        tail = Tail(tmp_path, procs, relay.url, "--since", "earliest")
        events = tail.wait_count(2000, timeout=60)
        assert sorted(e["seq"] for e in events) == list(range(1, 2001))
        wait_for(
            lambda: httpx.get(relay.url + "/healthz", timeout=5).status_code == 200,
            10,
            "healthy again",
        )
        log = relay.proc.output()
        assert "Traceback" not in log and "the event log stores again" in log
    finally:
        for p in procs:
            p.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)
