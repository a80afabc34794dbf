"""HTTP Basic logins for readers, as dCache's clients make them: ``[[user]]`` entries with a
salted scrypt hash (``storage-events-relay user add``), or any user name with a token as the
password; the same scopes as tokens; ``GET /api/v1/user`` answering as dCache's frontend."""

from __future__ import annotations

import base64
import json
import subprocess
import threading

import httpx
import pytest
import sseclient
from conftest import Relay, Tail, agents_connected, command, start_agent, wait_for
from test_dcache_api import write

from storage_events.relay import auth as auth_module
from storage_events.relay.auth import (
    BAD_LOGIN,
    Authenticator,
    AuthError,
    Basic,
    TokenConfig,
    UserConfig,
    basic,
    bearer,
    check_password,
    hash_password,
    hash_token,
)

PASSWORD = "correct horse battery"


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- pure -----------------------------------------------------------------------------------


def test_a_password_hash_is_salted_and_checks_only_its_password():
    one, two = hash_password(PASSWORD), hash_password(PASSWORD)
    assert one != two and one.startswith("scrypt:16384:8:1:")
    assert check_password(PASSWORD, one) and check_password(PASSWORD, two)
    assert not check_password(PASSWORD + "!", one)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (header("alice", "pw:with:colons"), Basic("alice", "pw:with:colons")),
        (header("ülrich", "pässword"), Basic("ülrich", "pässword")),
        ("Basic " + base64.b64encode(b"no-colon").decode(), Basic("", "")),
        ("Basic !!!not-base64!!!", Basic("", "")),
        ("Basic " + base64.b64encode(b"\xff\xfe:x").decode(), Basic("", "")),
        ("Bearer tok", "tok"),
    ],
)
def test_credentials_are_read_from_the_header(value, expected):
    assert bearer(value, None) == expected


def authenticator() -> tuple[Authenticator, str]:
    token = "t" * 43
    tokens = [TokenConfig(name="pipeline", role="reader", hash=hash_token(token), sites=["s1"])]
    users = [UserConfig(name="alice", hash=hash_password(PASSWORD), paths=["/data/public"])]
    return Authenticator(tokens, None, users), token


def test_a_user_logs_in_with_its_password_and_gets_its_scope(monkeypatch):
    auth, _ = authenticator()
    checks = []
    real = auth_module.check_password
    monkeypatch.setattr(auth_module, "check_password", lambda *a: checks.append(1) or real(*a))
    cred = basic(header("alice", PASSWORD)[6:])
    assert auth.needs_check(cred)
    who = auth.identify(cred)
    assert (who.name, who.role, who.scope.prefixes) == ("user:alice", "reader", ("/data/public",))
    assert not auth.needs_check(cred) and auth.identify(cred) == who
    assert len(checks) == 1  # remembered: a client logging in on every request pays once
    with pytest.raises(AuthError, match="user name or password is not valid"):
        auth.identify(Basic("alice", "wrong password"))
    with pytest.raises(AuthError) as e:
        auth.identify(Basic("alice", "wrong password"))  # (remembered, refused again)
    assert str(e.value) == BAD_LOGIN and e.value.status == 401


def test_a_token_of_another_role_given_as_the_password_cannot_read():
    agent = "a" * 43
    tokens = [TokenConfig(name="node1", role="agent", hash=hash_token(agent), site="s1")]
    auth = Authenticator(tokens, None, [])
    assert auth.identify(Basic("x", agent)).role == "agent"
    with pytest.raises(AuthError, match="cannot read") as e:
        auth.reader(Basic("x", agent))
    assert e.value.status == 403


def test_a_dcache_role_request_in_the_user_name_names_the_user():
    auth, _ = authenticator()
    assert auth.identify(Basic("alice#admin", PASSWORD)).name == "user:alice"


def test_a_token_is_accepted_as_the_password_under_any_user_name():
    auth, token = authenticator()
    for user in ("pipeline", "anyone", "alice", ""):
        who = auth.identify(Basic(user, token))
        assert (who.name, who.scope.sites) == ("pipeline", frozenset({"s1"}))
    with pytest.raises(AuthError, match="user name or password"):
        auth.identify(Basic("bob", "not a token"))


# -- a real relay ---------------------------------------------------------------------------


def test_basic_logins_read_what_their_scope_allows(tmp_path, procs):
    made = subprocess.run(
        [
            command("storage-events-relay"),
            "user",
            "add",
            "alice",
            "--paths",
            str(tmp_path / "w" / "public"),
            "--password-stdin",
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    token_entry = subprocess.run(
        [command("storage-events-relay"), "token", "--name", "pipeline", "--role", "reader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    token = token_entry.split("\n", 1)[0].removeprefix("token: ")
    agent_entry = subprocess.run(
        [
            command("storage-events-relay"),
            "token",
            "--name",
            "agent",
            "--role",
            "agent",
            "--site",
            "test",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    agent_token = agent_entry.split("\n", 1)[0].removeprefix("token: ")
    config = tmp_path / "relay.toml"
    config.write_text(
        "heartbeat = 0.5\n"
        + made.split("\n", 1)[1]
        + token_entry.split("\n\n", 1)[1].split("\n", 1)[1]
        + agent_entry.split("\n\n", 1)[1].split("\n", 1)[1]
    )
    relay = Relay(tmp_path, procs, extra=("--config", str(config)), token=token)
    public, private = tmp_path / "w" / "public", tmp_path / "w" / "private"
    public.mkdir(parents=True)
    private.mkdir()
    start_agent(tmp_path, procs, relay.url, tmp_path / "w", extra=("--token", agent_token))
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    write(public / "a")
    write(private / "b")
    every = Tail(tmp_path, procs, relay.url, "--since", "earliest", "--token", token)
    every.wait_count(6)  # (public and private, announced by the agent's first start, first)

    # alice reads only her prefix, in catch-up.
    got = []
    with httpx.stream(
        "GET", relay.url + "/events?since=earliest", auth=("alice", PASSWORD), timeout=10
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:])["path"])
                if len(got) == 3:
                    break
    assert got == [str(public)] + [str(public / "a")] * 2

    # Wrong ones are refused, a token as the password works; a refusal offers Basic.
    r = httpx.get(relay.url + "/events", auth=("alice", "nope"), timeout=5)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="storage-events", Bearer'
    r = httpx.post(relay.url + "/api/v1/events/channels", timeout=5)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic realm=")

    # A flood of guesses (each a slow check, one at a time) never holds the event loop: a
    # request that needs no check is answered while the guesses are still being checked.
    finished: list[str] = []

    def guess(i: int) -> None:
        r = httpx.get(relay.url + "/api/v1/user", auth=("alice", f"guess {i}"), timeout=60)
        finished.append(f"guess {r.status_code}")

    flood = [threading.Thread(target=guess, args=(i,)) for i in range(30)]
    for t in flood:
        t.start()
    r = httpx.get(relay.url + "/api/v1/user", auth=("x", token), timeout=30)
    finished.append(f"reader {r.status_code}")
    for t in flood:
        t.join()
    assert finished.count("guess 401") == 30
    assert finished.index("reader 200") < len(finished) - 1, finished
    api = relay.url + "/api/v1"
    user = httpx.get(api + "/user", auth=("alice", PASSWORD), timeout=5).json()
    assert user == {  # (no null fields: dCache's JSON leaves them out)
        "status": "AUTHENTICATED",
        "homeDirectory": str(public),
        "rootDirectory": "/",
        "username": "alice",
    }
    assert httpx.get(api + "/user", auth=("x", token), timeout=5).json()["username"] == "pipeline"
    assert httpx.get(api + "/user", timeout=5).json()["status"] == "ANONYMOUS"
    assert httpx.get(api + "/user", auth=("alice", "nope"), timeout=5).status_code == 401

    # A dCache channel with Basic, read with sseclient as dCache's clients read it.
    channel = httpx.post(api + "/events/channels", auth=("alice", PASSWORD)).headers["location"]
    httpx.post(
        channel + "/subscriptions/inotify", json={"path": str(public)}, auth=("alice", PASSWORD)
    )
    seen: list = []
    client = sseclient.SSEClient(channel, auth=("alice", PASSWORD))

    def read() -> None:
        for msg in client:
            seen.append(json.loads(msg.data)["event"]["name"])
            if len(seen) == 2:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()  # (SSEClient connected when it was made)
    write(private / "c")  # not hers
    write(public / "d")
    reader.join(20)
    assert seen == ["d", "d"]  # IN_CREATE and IN_CLOSE_WRITE of hers only
    client.resp.close()


def test_dcacheclient_logs_in_and_drives_channels_unchanged(tmp_path, procs):
    """neicnordic's dcacheclient (the library behind ``dcache-admin`` and panoptes): it logs in
    as ``USER#admin`` with Basic, reads ``Location`` from the 201, lists channels."""
    from dcacheclient.client import Client

    entry = subprocess.run(
        [command("storage-events-relay"), "user", "add", "alice", "--password-stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = tmp_path / "relay.toml"
    config.write_text(entry.split("\n", 1)[1])
    relay = Relay(tmp_path, procs, extra=("--config", str(config)), token=None)
    dcache = Client(relay.url, username="alice", password=PASSWORD)
    try:
        assert dcache.identity.get_user_attributes()["status"] == "AUTHENTICATED"
        created = dcache.events.register()
        assert created.status_code == 201
        channel = created.headers["Location"]
        assert dcache.events.get_channels() == [channel]
        cid = channel.rsplit("/", 1)[1]
        assert dcache.events.channel_subscriptions(id=cid) == []
    finally:
        dcache.close()
    wrong = Client(relay.url, username="alice", password="wrong password")
    try:
        assert wrong.events.get_channels() is False  # (its way of saying 401)
    finally:
        wrong.close()
