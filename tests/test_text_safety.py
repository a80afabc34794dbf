"""Untrusted text is shown escaped: file names, names a peer chose and whatever a relay sends can
neither drive the terminal of `storage-events tail` nor forge lines there or in a log, and
tokens passed in a URL never reach the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
from collections.abc import Iterator

import httpx
import pytest
import websockets
from conftest import Relay, command, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sse_limits import FakeRelay

from storage_events.cliutil import setup_logging
from storage_events.printable import escape, escape_json
from storage_events.wire import Ack, Batch, Event, Hello, decode_to_agent, encode_frame

HOSTILE = [
    "\x1b[2J\x1b[3J\x1b[H",  # clear the screen and the scroll-back
    "\x1b]0;pwned\x07",  # set the window title
    "x\n9 test/n1 IN_DELETE /etc/passwd",  # a forged line
    "cr\rover",
    "tab\tx",
    "back\bspace",
    "del\x7f",
    "nel\x85x",
    "csi\x9b31m",  # C0, C1
    "ls\u2028x",
    "ps\u2029x",  # line and paragraph separators
    "rlo\u202etxt.exe",
    "lri\u2066x\u2069",
    "zw\u200bsp",
    "bom\ufeff",
    "tag\U000e0041",
    "nb\xa0sp",  # format characters, a space other than the space
    "bs\\x1b",  # a backslash: shown doubled, or it would read as the escape of a real ESC
]


def unescape(shown: str) -> str:
    short = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
    return re.sub(
        r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[tnr\\])",
        lambda m: short.get(m[1]) or chr(int(m[1][1:], 16)),
        shown,
    )


# -- the escaping itself ------------------------------------------------------------------------


def test_what_escape_shows():
    assert escape("/data/run 1/é 日本 🙂") == "/data/run 1/é 日本 🙂"
    assert escape("\x1b]0;t\x07") == r"\x1b]0;t\x07"
    assert escape("a\nb\rc\td\\e") == r"a\nb\rc\td\\e"
    assert escape("\x85\u2028\u202e\xa0\U000e0041\udcff") == r"\x85\u2028\u202e\xa0\U000e0041\udcff"


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.text())
def test_escaped_text_is_printable_and_names_exactly_one_text(text: str):
    shown = escape(text)
    assert shown.isprintable() and unescape(shown) == text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.recursive(
        st.none() | st.integers() | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=6,
    )
)
def test_escaped_json_is_printable_and_the_same_value(value: object):
    for text in (
        json.dumps(value, ensure_ascii=False, separators=(",", ":")),
        json.dumps(value, ensure_ascii=False),
    ):
        shown = escape_json(text)
        assert shown.isprintable() and json.loads(shown) == value


# -- storage-events tail ------------------------------------------------------------------------


def publish(relay: Relay, events: list[Event]) -> None:
    """Publish ``events`` as an agent would, over the relay's /ingest WebSocket."""

    async def run() -> None:
        async with websockets.connect(relay.url.replace("http://", "ws://") + "/ingest") as ws:
            await ws.send(encode_frame(Hello(site="test", node="n1", stream="n1:hostile")))
            await ws.recv()  # welcome
            await ws.send(encode_frame(Batch(events)))
            acked = 0
            while acked < events[-1].seq:
                ack = decode_to_agent(await asyncio.wait_for(ws.recv(), 10))
                assert isinstance(ack, Ack), ack
                acked = ack.seq

    asyncio.run(run())


def tail(url: str, n: int, fmt: str) -> list[str]:
    done = subprocess.run(
        [
            command("storage-events"),
            "tail",
            url,
            "--since",
            "earliest",
            "--count",
            str(n),
            "--format",
            fmt,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done
    lines = done.stdout.split("\n")
    assert lines.pop() == "" and len(lines) == n, done.stdout
    # One line per event for a reader that splits at any line end Unicode knows (as
    # str.splitlines does), and not one character a terminal acts on.
    assert done.stdout.splitlines() == lines and all(line.isprintable() for line in lines)
    return lines


def test_tail_shows_hostile_file_names_escaped(tmp_path, procs):
    relay = Relay(tmp_path, procs)
    paths = [f"/d/{name}" for name in HOSTILE]
    events = [
        Event(site="test", node="n1", path=p, flags=["IN_CREATE"], ts=1, stream="n1:hostile", seq=i)
        for i, p in enumerate(paths, 1)
    ]
    events.append(
        Event(
            site="test",
            node="n1",
            path="/d/renamed",
            old_path=paths[2],
            flags=["IN_MOVED_TO"],
            cookie=1,
            ts=1,
            stream="n1:hostile",
            seq=len(paths) + 1,
        )
    )
    publish(relay, events)

    text = tail(relay.url, len(events), "text")
    assert text[1] == r"2 test/n1 IN_CREATE /d/\x1b]0;pwned\x07"
    assert text[2] == r"3 test/n1 IN_CREATE /d/x\n9 test/n1 IN_DELETE /etc/passwd"
    assert text[-2] == r"18 test/n1 IN_CREATE /d/bs\\x1b"
    assert (
        text[-1] == r"19 test/n1 IN_MOVED_TO /d/renamed (from /d/x\n9 test/n1 IN_DELETE "
        r"/etc/passwd)"
    )
    for line, path in zip(text, paths, strict=False):
        assert unescape(line.split(" ", 3)[3]) == path

    # JSON lines stay JSON with the very same values: the escapes are JSON's own.
    lines = tail(relay.url, len(events), "json")
    assert [json.loads(line)["path"] for line in lines][:-1] == paths
    assert json.loads(lines[-1])["old_path"] == paths[2]


def test_tail_shows_whatever_a_hostile_relay_sends_escaped():
    forged = {
        "id": 1,
        "site": "s\x1b[2J",
        "node": "\u2028n",
        "path": "/p\x9b",
        "ts": 1,
        "flags": ["IN_\u202eX"],
        "stream": "s",
        "seq": 1,
    }
    body = (
        b"id: 1\nevent: inotify\ndata: "
        + json.dumps(forged).encode()
        + b"\n\n"
        # not JSON, with raw control characters, under an event type of its own
        + "id: 2\nevent: \x1b]0;t\x07\ndata: \x1b[31m\u2028\x85forged\n\n".encode()
        + b'id: 3\nevent: inotify\ndata: {"path": "\x1b[H"}\n\n'
    )
    relay = FakeRelay(lambda: [body])
    try:
        text = tail(relay.url, 3, "text")
        assert text == [
            r"1 s\x1b[2J/\u2028n IN_\u202eX /p\x9b",
            r"2 \x1b]0;t\x07 \x1b[31m\u2028\x85forged",
            r'3 inotify {"path": "\x1b[H"}',
        ]
        lines = tail(relay.url, 3, "json")
        assert json.loads(lines[0]) == forged
        assert lines[1] == r"\u001b[31m\u2028\u0085forged"
    finally:
        relay.close()


# -- logs ---------------------------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield root
    root.handlers, root.level = saved


FORGED = "x\n2026-01-01 00:00:00,000 CRITICAL storage_events.relay: forged\u2028also forged"


def test_the_text_log_cannot_be_forged_by_what_peers_send(capsys, root_logger):
    setup_logging(0)
    log = logging.getLogger("storage_events.relay")
    log.warning("stream %s of site %s via %s", FORGED, "\x1b[2J", ["a", FORGED])
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.rstrip("\n").isprintable()
    assert (
        r"stream x\n2026-01-01 00:00:00,000 CRITICAL storage_events.relay: forged"
        r"\u2028also forged of site \x1b[2J via ['a', 'x\\n2026" in err
    )
    try:
        raise ValueError("ours")
    except ValueError:
        log.exception("failed for %s", "y\nz")
    err = capsys.readouterr().err
    first, *traceback = err.splitlines()
    assert first.endswith(r"failed for y\nz")
    assert (
        traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "ValueError: ours"
    )  # our own traceback stays readable


def test_the_json_log_is_one_line_a_terminal_cannot_act_on(capsys, root_logger):
    setup_logging(0, "json")
    logging.getLogger("storage_events.relay").warning("via %s", FORGED + "\x85\x1b")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.rstrip("\n").isprintable()
    assert json.loads(err)["message"] == "via " + FORGED + "\x85\x1b"


def access(path: str) -> logging.LogRecord:
    # What uvicorn's access logger logs for each response.
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", path, "1.1", 200),
        None,
    )


def test_tokens_in_a_query_never_reach_the_log(capsys, root_logger):
    setup_logging(1)
    handler = root_logger.handlers[0]
    handler.handle(access("/events?path=/d&access_token=SECRET1&site=a&token=SECRET2"))
    handler.handle(access("/api/v1/events?access%5Ftoken=SECRET3"))  # the same, to the relay
    handler.handle(access("/events?path=/token=x"))
    handler.handle(
        logging.LogRecord(
            "uvicorn.error",
            logging.INFO,
            __file__,
            1,
            '%s - "WebSocket %s" [accepted]',
            ("127.0.0.1:5000", "/ingest?token=SECRET4"),
            None,
        )
    )
    err = capsys.readouterr().err
    assert "SECRET" not in err, err
    assert 'GET /events?path=/d&access_token=REDACTED&site=a&token=REDACTED HTTP/1.1" 200' in err
    assert "GET /api/v1/events?access%5Ftoken=REDACTED HTTP" in err
    assert "GET /events?path=/token=x HTTP" in err  # a value that merely looks like one
    assert '"WebSocket /ingest?token=REDACTED" [accepted]' in err


def test_a_verbose_relay_logs_requests_without_their_tokens(tmp_path, procs):
    relay = Relay(tmp_path, procs, extra=("-v",))
    assert relay.proc is not None
    with httpx.stream(
        "GET", relay.url + "/events?since=now&access_token=SECRET-A", timeout=10
    ) as r:
        status = r.status_code
    httpx.get(relay.url + "/healthz?token=SECRET-B", timeout=10)
    wait_for(lambda: "/healthz?token=REDACTED" in relay.proc.output(), 10, "the access log")
    log = relay.proc.output()
    assert f'"GET /events?since=now&access_token=REDACTED HTTP/1.1" {status}' in log, log
    assert "SECRET" not in log, log
