"""The SSE feed as plain HTTP clients see it: curl, filters live and in catch-up, heartbeats."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from conftest import Relay, Tail, agents_connected, start_agent, wait_for


@pytest.fixture
def chatty_relay(tmp_path, procs) -> Relay:
    config = tmp_path / "relay.toml"
    config.write_text("heartbeat = 0.2\n")
    return Relay(tmp_path, procs, extra=("--config", str(config)))


def curl_lines(url: str, seconds: float) -> list[str]:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    r = subprocess.run(
        [curl, "-sN", "--max-time", str(seconds), url],
        capture_output=True,
        text=True,
        timeout=seconds + 10,
    )
    assert r.returncode in (0, 28), r.stderr  # 28: --max-time reached, as intended
    return r.stdout.splitlines()


def test_curl_gets_events_resume_point_and_heartbeats(tmp_path, procs, chatty_relay):
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, chatty_relay.url, root)
    wait_for(lambda: agents_connected(chatty_relay), 10, "agent connection")
    (root / "a.txt").write_text("x")
    wait_for(lambda: chatty_relay.healthy()["head"] >= 2, 10, "events stored")

    lines = curl_lines(chatty_relay.url + "/events?since=earliest", 1.0)
    assert lines[:3] == ["retry: 1000", "id: 0", ""]
    data = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert [(d["id"], d["flags"]) for d in data] == [(1, ["IN_CREATE"]), (2, ["IN_CLOSE_WRITE"])]
    assert "id: 2" in lines and "event: inotify" in lines
    assert lines.count(": heartbeat") >= 2  # idle for ~1 s at a 0.2 s heartbeat

    live = curl_lines(chatty_relay.url + "/events", 0.5)
    assert live[:2] == ["retry: 1000", "id: 2"]  # "now" starts after the newest event


def test_filters_select_the_same_events_live_and_in_catch_up(tmp_path, procs, relay):
    root = tmp_path / "w"
    (root / "data" / "run1").mkdir(parents=True)
    (root / "data2").mkdir()
    start_agent(tmp_path, procs, relay.url, root)
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    args = ("--path", str(root / "data"), "--type", "IN_CLOSE_WRITE", "--site", "test")
    live = Tail(tmp_path, procs, relay.url, *args, name="live")
    time.sleep(1.0)  # let the live subscriber connect before anything happens

    for d in ("data", "data/run1", "data2"):
        for i in range(20):
            (root / d / f"f{i}").write_text("x")
    expected = {str(root / d / f"f{i}") for d in ("data", "data/run1") for i in range(20)}
    got_live = live.wait_count(len(expected))
    wait_for(lambda: relay.healthy()["head"] >= 120, 20, "all events stored")
    time.sleep(0.5)

    catch_up = Tail(
        tmp_path,
        procs,
        relay.url,
        *args,
        "--since",
        "earliest",
        "--count",
        str(len(expected)),
        name="catchup",
    )
    got_catch_up = catch_up.wait_count(len(expected))
    for got in (got_live, got_catch_up):
        assert {e["path"] for e in got} == expected  # /data2 never matches /data
        assert {tuple(e["flags"]) for e in got} == {("IN_CLOSE_WRITE",)}
    assert [e["id"] for e in got_live] == [e["id"] for e in got_catch_up]
    assert len(live.events()) == len(expected)


def publish(relay: Relay, n: int, stream: str = "n1:retention") -> None:
    """Publish ``n`` events over the ingest protocol, as an agent would."""
    import asyncio

    import websockets

    from storage_events.wire import Batch, Event, Hello, decode_to_agent, encode_frame

    async def run() -> None:
        async with websockets.connect(relay.url.replace("http", "ws") + "/ingest") as ws:
            await ws.send(encode_frame(Hello(site="s1", node="n1", stream=stream)))
            await ws.recv()
            events = [
                Event(
                    site="s1",
                    node="n1",
                    path=f"/d/f{i}",
                    flags=["IN_CLOSE_WRITE"],
                    ts=1,
                    stream=stream,
                    seq=i,
                )
                for i in range(1, n + 1)
            ]
            await ws.send(encode_frame(Batch(events)))
            decode_to_agent(await ws.recv())

    asyncio.run(run())


def test_retention_drops_old_events_and_resuming_before_them_says_gap(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text("retention_events = 100\nretention_check = 0.2\n")
    relay = Relay(tmp_path, procs, extra=("--config", str(config)))
    publish(relay, 300)
    wait_for(lambda: relay.healthy()["first"] == 201, 10, "retention to drop 200 events")

    resumed = Tail(
        tmp_path, procs, relay.url, "--since", "50", "--count", "101", name="resumed"
    ).wait_count(101)
    assert resumed[0] == {"type": "gap", "lost_from": 51, "lost_to": 200, "resumes_after": 200}
    assert [e["id"] for e in resumed[1:]] == list(range(201, 301))

    earliest = Tail(
        tmp_path, procs, relay.url, "--since", "earliest", "--count", "100", name="earliest"
    ).wait_count(100)
    assert [e["id"] for e in earliest] == list(range(201, 301))  # no gap: nothing was asked
    lines = curl_lines(relay.url + "/events?since=10", 0.5)
    assert lines[:7] == [
        "retry: 1000",
        "id: 10",
        "",
        "id: 200",
        "event: gap",
        'data: {"type":"gap","lost_from":11,"lost_to":200,"resumes_after":200}',
        "",
    ]


def test_metrics(tmp_path, procs, relay):
    import httpx

    publish(relay, 5, stream="n1:metrics")
    Tail(tmp_path, procs, relay.url, "--since", "earliest", "--count", "5").wait_count(5)
    text = httpx.get(relay.url + "/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["storage_events_relay_events_in_total"] == 5
    assert values["storage_events_relay_events_out_total"] >= 5
    assert values["storage_events_relay_log_head"] == 5
    assert values['storage_events_relay_lag_seconds{site="s1"}'] > 0
    assert 'storage_events_relay_agent_connections{site="s1"} 0.0' in text


def test_sigterm_tells_subscribers_to_reconnect_and_stops_promptly(tmp_path, procs, relay):
    import signal
    import time

    publish(relay, 3, stream="n1:shutdown")
    tail = Tail(tmp_path, procs, relay.url, "--since", "earliest")
    tail.wait_count(3)
    started = time.monotonic()
    # uvicorn ends by re-raising the signal it handled, which systemd counts as a clean stop
    assert relay.proc.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 5
    wait_for(lambda: "shutting down" in tail.proc.output(), 10, "the tail to hear of it")
    relay.start()  # the same subscriber resumes after its last id: nothing twice
    publish(relay, 2, stream="n1:after")
    events = tail.wait_count(5)
    assert [e["id"] for e in events] == [1, 2, 3, 4, 5]


def test_tls(tmp_path, procs):
    if not (shutil.which("openssl") and shutil.which("curl")):
        pytest.skip("openssl and curl are needed to make and try a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    relay = Relay(
        tmp_path,
        procs,
        name="tls",
        scheme="https",
        extra=("--certfile", str(cert), "--keyfile", str(key)),
    )
    assert relay.url.startswith("https://")
    r = subprocess.run(
        ["curl", "-s", "--cacert", str(cert), relay.url + "/healthz"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert '"status":"ok"' in r.stdout
