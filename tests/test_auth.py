"""Authorization matrix: who may publish as which site, who sees which events, live and in
catch-up, with relay tokens and JWTs."""

from __future__ import annotations

import asyncio
import time
import tomllib

import httpx
import jwt
import msgspec
import pytest
import websockets
from click.testing import CliRunner
from conftest import ChannelReader, Relay, Tail
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from storage_events.relay.auth import (
    Authenticator,
    AuthError,
    Identity,
    JWTConfig,
    TokenConfig,
)
from storage_events.relay.auth import hash_token as h
from storage_events.relay.cli import main
from storage_events.relay.ingest.session import IngestLimits, IngestSession, ProtocolError
from storage_events.wire import Batch, Error, Event, Hello, decode_to_agent, encode_frame

TOKENS = {
    name: f"secret-{name}-0123456789" for name in ("agent-a", "agent-b", "r-all", "r-a", "r-pub")
}

CONFIG = f"""
[[token]]
name = "agent-a"
role = "agent"
site = "a"
hash = "{h(TOKENS["agent-a"])}"

[[token]]
name = "agent-b"
role = "agent"
site = "b"
hash = "{h(TOKENS["agent-b"])}"

[[token]]
name = "r-all"
role = "reader"
hash = "{h(TOKENS["r-all"])}"

[[token]]
name = "r-a"
role = "reader"
sites = ["a"]
hash = "{h(TOKENS["r-a"])}"

[[token]]
name = "r-pub"
role = "reader"
paths = ["/data/b/public"]
hash = "{h(TOKENS["r-pub"])}"
"""


def ev(
    site: str, stream: str, seq: int, path: str, flag: str = "IN_CLOSE_WRITE", **kw: object
) -> Event:
    return Event(site=site, node="n1", path=path, flags=[flag], ts=1, stream=stream, seq=seq, **kw)


A_EVENTS = [ev("a", "n1:a", 1, "/data/a/x1"), ev("a", "n1:a", 2, "/data/a/x2")]
B_EVENTS = [
    ev("b", "n1:b", 1, "/data/b/public/p1"),
    ev("b", "n1:b", 2, "/data/b/private/q1"),
    ev("b", "n1:b", 3, "/data/b/private/m", "IN_MOVED_FROM", cookie=7),
    ev("b", "n1:b", 4, "/data/b/public/m", "IN_MOVED_TO", cookie=7, old_path="/data/b/private/m"),
]


async def publish(
    relay: Relay, token: str | None, site: str, stream: str, events: list[Event]
) -> str | None:
    """Publish; returns the relay's error message if it refused."""
    async with websockets.connect(relay.url.replace("http", "ws") + "/ingest") as ws:
        await ws.send(encode_frame(Hello(site=site, node="n1", stream=stream, token=token)))
        reply = decode_to_agent(await ws.recv())
        if isinstance(reply, Error):
            return reply.message
        await ws.send(encode_frame(Batch(events)))
        reply = decode_to_agent(await ws.recv())
        return reply.message if isinstance(reply, Error) else None


# Each reader's dCache channel watches these directories (not recursive, as in dCache); what
# it may not read is refused with 400 "Permission denied", as dCache does.
WATCHES = {
    "r-all": {"/data/a": 201, "/data/b/public": 201, "/data/b/private": 201},
    "r-a": {"/data/a": 201, "/data/b/public": 201, "/data/b/private?site=b": 400},
    "r-pub": {"/data/b/public": 201, "/data/b/private": 400, "/data/a": 400},
    "jwt": {"/data/b/private": 201, "/data/b/public": 400, "/data/a?site=a": 400},
}
DCACHE_EXPECTED = {  # (name, first mask flag, carries a cookie)
    "r-all": [
        ("x1", "IN_CLOSE_WRITE", False),
        ("x2", "IN_CLOSE_WRITE", False),
        ("p1", "IN_CLOSE_WRITE", False),
        ("q1", "IN_CLOSE_WRITE", False),
        ("m", "IN_MOVED_FROM", True),
        ("m", "IN_MOVED_TO", True),
    ],
    "r-a": [("x1", "IN_CLOSE_WRITE", False), ("x2", "IN_CLOSE_WRITE", False)],
    "r-pub": [("p1", "IN_CLOSE_WRITE", False), ("m", "IN_MOVED_TO", False)],
    "jwt": [("q1", "IN_CLOSE_WRITE", False), ("m", "IN_MOVED_FROM", True)],
}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def dcache_channel(relay: Relay, token: str, name: str) -> str:
    api = relay.url + "/api/v1/events"
    r = httpx.post(api + "/channels", headers=auth(token))
    assert r.status_code == 201, r.text
    channel = r.headers["location"]
    for watch, code in WATCHES[name].items():
        path, _, site = watch.partition("?site=")
        r = httpx.post(
            channel + "/subscriptions/inotify",
            headers=auth(token),
            json={"path": path} | ({"site": site} if site else {}),
        )
        assert r.status_code == code, (name, watch, r.text)
        if code == 400:
            assert r.json()["detail"].startswith("Permission denied"), r.text
    return channel


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def test_authorization_matrix(tmp_path, procs, rsa_key):
    private, public = rsa_key
    (tmp_path / "jwt.pub").write_bytes(public)
    config = tmp_path / "relay.toml"
    config.write_text(
        CONFIG + f'\n[jwt]\nalgorithms = ["RS256"]\npublic_key_file = "{tmp_path / "jwt.pub"}"\n'
    )
    relay = Relay(tmp_path, procs, extra=("--config", str(config)), token=TOKENS["r-all"])
    jwt_reader = jwt.encode(
        {
            "sub": "carol",
            "sites": ["b"],
            "paths": ["/data/b/private"],
            "exp": int(time.time()) + 600,
        },
        private,
        algorithm="RS256",
    )
    readers = {**{n: TOKENS[n] for n in ("r-all", "r-a", "r-pub")}, "jwt": jwt_reader}
    live = {
        name: Tail(tmp_path, procs, relay.url, "--token", token, name=f"live-{name}")
        for name, token in readers.items()
    }
    channels = {name: dcache_channel(relay, token, name) for name, token in readers.items()}
    dcache_live = {
        name: ChannelReader(url, headers=auth(readers[name])) for name, url in channels.items()
    }
    time.sleep(1.5)  # the live subscribers are connected before anything is published

    # Publishing: only as the token's own site, only with an agent token.
    assert asyncio.run(publish(relay, TOKENS["agent-a"], "a", "n1:a", A_EVENTS)) is None
    assert asyncio.run(publish(relay, TOKENS["agent-b"], "b", "n1:b", B_EVENTS)) is None
    forged = asyncio.run(
        publish(
            relay, TOKENS["agent-a"], "b", "n1:forged", [ev("b", "n1:forged", 1, "/data/b/evil")]
        )
    )
    assert forged == "token 'agent-a' may publish as site 'a', not 'b'"
    assert "needs a token" in asyncio.run(publish(relay, None, "a", "n1:anon", A_EVENTS))
    assert "cannot publish" in asyncio.run(publish(relay, TOKENS["r-all"], "a", "n1:r", A_EVENTS))
    assert "not valid" in asyncio.run(publish(relay, "wrong", "a", "n1:w", A_EVENTS))
    assert relay.healthy()["head"] == 6

    expected = {
        "r-all": [
            "/data/a/x1",
            "/data/a/x2",
            "/data/b/public/p1",
            "/data/b/private/q1",
            "/data/b/private/m",
            "/data/b/public/m",
        ],
        "r-a": ["/data/a/x1", "/data/a/x2"],
        "r-pub": ["/data/b/public/p1", "/data/b/public/m"],
        "jwt": ["/data/b/private/q1", "/data/b/private/m"],
    }
    for name, token in readers.items():
        catch_up = Tail(
            tmp_path,
            procs,
            relay.url,
            "--token",
            token,
            "--since",
            "earliest",
            name=f"catchup-{name}",
        )
        for how, tail in (("live", live[name]), ("catch-up", catch_up)):
            got = tail.wait_count(len(expected[name]))
            time.sleep(0.3)
            got = tail.events()
            assert [e["path"] for e in got] == expected[name], (name, how)
            moved = [e for e in got if e["flags"] == ["IN_MOVED_TO"]]
            for e in moved:  # a move from where the reader may not look keeps that secret
                secret = name == "r-pub"
                assert (e["old_path"] is None) == secret, (name, how)
                assert (e["cookie"] is None) == secret, (name, how)

    # The same rights through the dCache API: live, and replaying a channel's whole backlog.
    for name, token in readers.items():
        replay = ChannelReader(channels[name], last_event_id="-1", headers=auth(token))
        for how, reader in (("live", dcache_live[name]), ("replay", replay)):
            reader.wait(len(DCACHE_EXPECTED[name]))
            time.sleep(0.3)
            got = [
                (m["event"]["name"], m["event"]["mask"][0], "cookie" in m["event"])
                for kind, _, m in reader.messages()
                if kind == "inotify"
            ]
            assert got == DCACHE_EXPECTED[name], (name, how)
    api = relay.url + "/api/v1/events"
    assert httpx.get(api).status_code == 200  # the one anonymous call, as in dCache
    r = httpx.post(api + "/channels")
    assert r.status_code == 401 and r.json()["status"] == "401" and "needs a token" in r.text
    r = httpx.get(channels["r-all"], headers=auth(TOKENS["r-a"]))
    assert r.status_code == 403 and "another user" in r.json()["detail"]
    assert httpx.get(api + "/channels/unknown", headers=auth(TOKENS["r-a"])).status_code == 404
    r = httpx.post(api + "/channels", headers=auth(TOKENS["agent-a"]))
    assert r.status_code == 403 and "cannot read" in r.json()["detail"]

    def status(**kw: object) -> tuple[int, str]:
        r = httpx.get(relay.url + "/events", timeout=5, **kw)
        return r.status_code, r.text

    assert status()[0] == 401
    assert status(headers={"Authorization": "Bearer nope"})[0] == 401
    code, text = status(headers={"Authorization": f"Bearer {TOKENS['agent-a']}"})
    assert code == 403 and "cannot read" in text
    code, text = status(params={"site": "b", "access_token": TOKENS["r-a"]})
    assert code == 403 and "may not read site(s) b" in text
    forged_jwt = jwt.encode(
        {"sub": "eve", "exp": int(time.time()) + 60}, "a guessed secret" * 3, algorithm="HS256"
    )
    code, text = status(headers={"Authorization": f"Bearer {forged_jwt}"})
    assert code == 401 and "JWT was refused" in text


def test_with_tokens_a_public_address_is_allowed(tmp_path, procs):
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    relay = Relay(tmp_path, procs, host="0.0.0.0", extra=("--config", str(config)))
    assert relay.healthy()["status"] == "ok"


@pytest.mark.parametrize("algorithm", ["HS256", "ES256"])
def test_jwt_claims_become_the_readers_scope(tmp_path, algorithm):
    if algorithm == "HS256":
        sign, cfg = (
            "shared-secret-of-enough-length-32b",
            JWTConfig(secret="shared-secret-of-enough-length-32b"),
        )
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        sign = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pub = tmp_path / "ec.pub"
        pub.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        cfg = JWTConfig(algorithms=["ES256"], public_key_file=str(pub), audience="relay")
    auth = Authenticator([], cfg)
    claims = {"sub": "dave", "sites": ["x"], "paths": ["/p/"], "exp": int(time.time()) + 600}
    if algorithm == "ES256":
        claims["aud"] = "relay"
    who = auth.identify(jwt.encode(claims, sign, algorithm=algorithm))
    assert who is not None and who.name == "jwt:dave" and who.role == "reader"
    assert who.scope.allows("x", "/p/q") and not who.scope.allows("x", "/pq")
    assert not who.scope.allows("y", "/p/q")
    with pytest.raises(AuthError, match="'paths' must be a list"):
        auth.identify(jwt.encode({**claims, "paths": "/p"}, sign, algorithm=algorithm))
    with pytest.raises(AuthError, match="JWT was refused"):
        auth.identify(jwt.encode({**claims, "exp": 1}, sign, algorithm=algorithm))
    with pytest.raises(AuthError, match="no `sub` claim"):
        auth.identify(
            jwt.encode({k: v for k, v in claims.items() if k != "sub"}, sign, algorithm=algorithm)
        )


def test_token_config_rules():
    with pytest.raises(ValueError, match="needs the site"):
        TokenConfig(name="x", role="agent", hash=h("t"))
    auth = Authenticator([TokenConfig(name="x", role="agent", site="s", hash=h("t"))], None)
    assert auth.identify("t").site == "s"
    with pytest.raises(AuthError, match="needs a token"):
        auth.identify(None)
    assert Authenticator([], None).identify(None) is None  # no auth configured: anonymous


SECRET = "shared-secret-of-enough-length-32b"


def signed(**claims: object) -> str:
    return jwt.encode({"sub": "dave", **claims}, SECRET, algorithm="HS256")


def test_a_jwt_must_expire_and_soon_enough():
    now = int(time.time())
    century = now + 100 * 365 * 86400
    auth = Authenticator([], JWTConfig(secret=SECRET))
    with pytest.raises(AuthError, match="JWT was refused: it has no `exp`"):
        auth.identify(signed())
    with pytest.raises(
        AuthError,
        match=r"JWT was refused: its lifetime of 3153600000 s "
        r"\(exp - iat\) is more than .* 86400 s",
    ):
        auth.identify(signed(iat=now, exp=century))
    with pytest.raises(
        AuthError,
        match=r"JWT was refused: its lifetime of 315\d{7} s "
        r"\(exp - now, it has no iat\) is more than .* 86400 s",
    ):
        auth.identify(signed(exp=century))
    assert auth.identify(signed(iat=now, exp=now + 86400)).name == "jwt:dave"
    assert auth.identify(signed(exp=now + 3600)).name == "jwt:dave"
    strict = Authenticator([], JWTConfig(secret=SECRET, max_lifetime=60))
    with pytest.raises(AuthError, match=r"lifetime of 120 s \(exp - iat\) .* 60 s"):
        strict.identify(signed(iat=now - 100, exp=now + 20))  # issued for 120 s, 20 s left
    assert strict.identify(signed(exp=now + 50)).name == "jwt:dave"


def test_a_relay_token_pushes_only_its_own_site_unless_it_lists_others():
    auth = Authenticator(
        [
            TokenConfig(name="kit-relay", role="relay", site="kit", hash=h("t1")),
            TokenConfig(name="hub", role="relay", site="hub", sites=["kit", "desy"], hash=h("t2")),
        ],
        None,
    )
    assert auth.identify("t1").scope.sites == frozenset({"kit"})
    assert auth.identify("t2").scope.sites == frozenset({"kit", "desy"})
    session = IngestSession(IngestLimits(), auth, "central")
    session.receive(
        encode_frame(Hello(role="relay", site="kit", node="kit", stream="relay:kit:1", token="t1"))
    )
    own = Event(
        site="kit",
        node="n",
        path="/k",
        flags=["IN_CREATE"],
        ts=1,
        stream="n:1",
        seq=1,
        id=1,
        origin_id=1,
        via=["kit"],
    )
    assert session.receive(encode_frame(Batch([own]))) == [own]
    forged = Event(
        site="desy",
        node="n",
        path="/d",
        flags=["IN_CREATE"],
        ts=1,
        stream="d:1",
        seq=1,
        id=2,
        origin_id=2,
        via=["kit"],
    )
    with pytest.raises(ProtocolError, match="relay 'kit' may not push events of site 'desy'"):
        session.receive(encode_frame(Batch([forged])))


def test_an_agent_token_may_be_bound_to_a_node():
    entry = {"name": "pool", "role": "agent", "site": "desy", "hash": h("t")}
    auth = Authenticator(
        [
            msgspec.convert({**entry, "node": "pool-07"}, TokenConfig),
            msgspec.convert({**entry, "hash": h("u")}, TokenConfig),
        ],
        None,
    )
    assert auth.identify("t").node == "pool-07"
    assert auth.identify("u").node is None  # any node of its site
    with pytest.raises(msgspec.ValidationError, match=r"node"):
        msgspec.convert({**entry, "node": "../pool"}, TokenConfig)
    with pytest.raises(msgspec.ValidationError, match="reader token 'pool' takes no `node`"):
        msgspec.convert({**entry, "role": "reader", "site": None, "node": "pool-07"}, TokenConfig)


def test_a_metrics_token_scrapes_and_nothing_else():
    auth = Authenticator([TokenConfig(name="prom", role="metrics", hash=h("m"))], None)
    assert auth.identify("m").role == "metrics"
    with pytest.raises(AuthError, match="'prom' is a metrics token: it cannot read") as e:
        auth.reader("m")
    assert e.value.status == 403
    for field, value in (("site", "a"), ("sites", ["a"]), ("paths", ["/p"])):
        with pytest.raises(ValueError, match=f"metrics token 'prom' takes no `{field}`"):
            TokenConfig(name="prom", role="metrics", hash=h("m"), **{field: value})


def make_token(*args: str) -> tuple[int, str, Identity | None]:
    """``storage-events-relay token --name x ARGS``: exit code, output, and who the token it
    printed is to a relay configured with the [[token]] entry it printed."""
    result = CliRunner().invoke(main, ["token", "--name", "x", *args])
    if result.exit_code != 0:
        return result.exit_code, result.output, None
    secret = result.output.split("\n", 1)[0].removeprefix("token: ")
    entry = tomllib.loads(result.output.split("[[token]]\n", 1)[1])
    auth = Authenticator([msgspec.convert(entry, TokenConfig)], None)
    return 0, result.output, auth.identify(secret)


def test_the_token_command_makes_metrics_node_bound_and_narrow_relay_tokens():
    code, _, who = make_token("--role", "metrics")
    assert code == 0 and who is not None and who.role == "metrics"
    for wrong in (("--site", "a"), ("--sites", "a"), ("--paths", "/p"), ("--node", "n")):
        code, out, _ = make_token("--role", "metrics", *wrong)
        assert code == 2 and f"metrics tokens take no {wrong[0]}" in out, out
    code, _, who = make_token("--role", "agent", "--site", "desy", "--node", "pool-07")
    assert code == 0 and who is not None and (who.site, who.node) == ("desy", "pool-07")
    code, out, _ = make_token("--role", "reader", "--node", "pool-07")
    assert code == 2 and "reader tokens take no --node" in out, out
    code, out, _ = make_token("--role", "agent", "--site", "desy", "--node", "pool 07")
    assert code == 2 and "'pool 07' is not a valid node name" in out, out
    code, _, who = make_token("--role", "relay", "--site", "kit")
    assert code == 0 and who is not None and who.scope.sites == {"kit"}
    help_text = " ".join(CliRunner().invoke(main, ["token", "--help"]).output.split())
    assert "may push events of (repeat; default: only its own --site)" in help_text
