"""WLCG / SciTokens JWTs: ``scope`` claims ``storage.read:/path`` as the reader's path scopes,
live and in catch-up; the issuer's keys from a JWKS URL, a rotated key picked up."""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import jwt
from conftest import Relay, Tail, agents_connected, free_port, start_agent, wait_for
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from test_dcache_api import write

from storage_events.relay.auth import hash_token

AGENT = "agent-secret-0123456789"


class Issuer:
    """A JWKS endpoint serving whichever keys the test says, and tokens signed with them."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.served: list[str] = []
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                keys = []
                for kid in issuer.served:
                    jwk = json.loads(RSAAlgorithm.to_jwk(issuer.keys[kid].public_key()))
                    keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
                body = json.dumps({"keys": keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"

    def rotate(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.served = [kid]

    def token(self, kid: str, scope: str, sub: str = "alice") -> str:
        now = int(time.time())
        claims = {"sub": sub, "scope": scope, "iat": now, "exp": now + 600, "wlcg.ver": "1.0"}
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_wlcg_token_reads_only_its_storage_read_paths_and_a_rotated_key_is_picked_up(
    tmp_path, procs
):
    issuer = Issuer()
    try:
        issuer.rotate("k1")
        config = tmp_path / "relay.toml"
        config.write_text(
            f"""
[jwt]
algorithms = ["RS256"]
jwks_url = "{issuer.url}"

[[token]]
name = "agent"
role = "agent"
site = "test"
hash = "{hash_token(AGENT)}"
"""
        )
        relay = Relay(tmp_path, procs, extra=("--config", str(config)), token=AGENT)
        root = tmp_path / "w"
        public, private = root / "data" / "public", root / "data" / "private"
        public.mkdir(parents=True)
        private.mkdir()
        start_agent(tmp_path, procs, relay.url, root, extra=("--token", AGENT))
        wait_for(lambda: agents_connected(relay), 10, "agent connection")
        write(public / "before")
        write(private / "before")
        token = issuer.token("k1", f"storage.read:{public} storage.create:{public}")

        live = Tail(tmp_path, procs, relay.url, "--token", token, name="live")
        past = Tail(
            tmp_path, procs, relay.url, "--token", token, "--since", "earliest", name="past"
        )
        time.sleep(1.0)
        write(public / "after")
        write(private / "after")
        seen_live = live.wait_count(2)
        seen_past = past.wait_count(5)  # public itself (announced), before x2, after x2
        time.sleep(1.0)
        for got in (live.events(), past.events()):
            assert got and all(e["path"].startswith(str(public)) for e in got), got
        assert {e["path"] for e in seen_live} == {str(public / "after")}
        assert {e["path"] for e in seen_past} >= {str(public / "before"), str(public / "after")}

        # Without storage.read: nothing to read (403, saying why); a made-up key id: 401.
        r = httpx.get(
            relay.url + "/events",
            headers={"Authorization": f"Bearer {issuer.token('k1', f'storage.create:{public}')}"},
        )
        assert r.status_code == 403 and "storage.read" in r.text
        # The issuer rotates its key: a token signed with the new one is accepted.
        issuer.rotate("k2")
        fresh = issuer.token("k2", f"storage.read:{public}")
        wait_for(
            lambda: (
                httpx.get(relay.url + "/api/v1/user", headers={"Authorization": f"Bearer {fresh}"})
                .json()
                .get("status")
                == "AUTHENTICATED"
            ),
            30,
            "the rotated key accepted",
        )
        r = httpx.get(
            relay.url + "/state",
            params={"path": str(root)},
            headers={"Authorization": f"Bearer {fresh}"},
        )
        assert r.status_code == 200
        assert {e["path"] for e in r.json()["entries"]} == {
            str(public),
            str(public / "before"),
            str(public / "after"),
        }
    finally:
        issuer.close()


def test_storage_read_scopes_become_path_prefixes():
    import pytest

    from storage_events.relay.auth import AuthError, _storage_read

    assert _storage_read("jwt:a", "openid storage.read:/data/public storage.create:/x") == [
        "/data/public"
    ]
    assert _storage_read("jwt:a", "storage.read:/ offline_access") == ["/"]
    assert _storage_read("jwt:a", "storage.read:") == ["/"]  # (WLCG: no path means all)
    with pytest.raises(AuthError) as refused:
        _storage_read("jwt:a", "storage.modify:/data")
    assert refused.value.status == 403
    with pytest.raises(AuthError):
        _storage_read("jwt:a", ["storage.read:/data"])
