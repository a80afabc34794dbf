"""The namespace view over HTTP, against a real relay and agent: ``GET /state`` page by page,
``since=snapshot`` through ``storage-events tail``, dCache's namespace listing driven by
dcacheclient unchanged (as panoptes walks a tree before it watches), and a reader's scope
holding in all three."""

from __future__ import annotations

import os
import subprocess

import httpx
from conftest import Relay, Tail, agents_connected, start_agent, wait_for

from storage_events.relay.auth import hash_token

AGENT, ALL, PUBLIC = "agent-secret-0123456789", "reader-all-0123456789", "reader-pub-0123456789"


def _tree(root):
    for d in ("public/run1", "public/run2/deep", "private/keys"):
        (root / d).mkdir(parents=True)
    for f in ("public/run1/a.h5", "public/run2/deep/b.h5", "private/keys/secret", "top.txt"):
        (root / f).write_bytes(b"0123456789")


def _relay(tmp_path, procs, root, tls=None):
    """``tls``: pytest's monkeypatch, for a relay on https:// whose agent trusts its
    certificate (a test's, self-signed)."""
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
[[token]]
name = "agent"
role = "agent"
site = "test"
hash = "{hash_token(AGENT)}"

[[token]]
name = "all"
role = "reader"
hash = "{hash_token(ALL)}"

[[token]]
name = "pub"
role = "reader"
paths = ["{root}/public"]
hash = "{hash_token(PUBLIC)}"
"""
    )
    extra: tuple[str, ...] = ("--config", str(config))
    if tls is not None:
        key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
                *("-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
        )
        extra += ("--certfile", str(cert), "--keyfile", str(key))
        tls.setenv("SSL_CERT_FILE", str(cert))  # (what the agent started below trusts)
    relay = Relay(tmp_path, procs, extra=extra, token=ALL, scheme="https" if tls else "http")
    start_agent(tmp_path, procs, relay.url, root, extra=("--token", AGENT))
    wait_for(lambda: agents_connected(relay), 10, "agent connection")
    return relay


def _state(relay, token, **params):
    r = httpx.get(relay.url + "/state", params=params, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r.json()


def _all_pages(relay, token, path, limit):
    entries, after, pages = [], None, 0
    while True:
        page = _state(relay, token, path=path, limit=limit, **({"after": after} if after else {}))
        entries += page["entries"]
        pages += 1
        after = page["next"]
        if after is None:
            return entries, pages


def test_state_lists_what_a_root_held_before_the_agent_started_page_by_page(tmp_path, procs):
    root = tmp_path / "w"
    _tree(root)
    relay = _relay(tmp_path, procs, root)
    expected = {
        os.path.join(top, n): n in dirs for top, dirs, files in os.walk(root) for n in dirs + files
    }
    wait_for(lambda: len(_all_pages(relay, ALL, str(root), 1000)[0]) == len(expected), 20, "view")
    entries, pages = _all_pages(relay, ALL, str(root), 3)
    assert pages == -(-len(expected) // 3) or pages == -(-len(expected) // 3) + 1
    assert {e["path"]: e["is_dir"] for e in entries} == expected
    assert [e["path"] for e in entries] == sorted(e["path"] for e in entries)

    (root / "public" / "run1" / "a.h5").rename(root / "public" / "a.h5")
    (root / "private" / "keys" / "secret").unlink()
    wait_for(
        lambda: (
            {e["path"] for e in _all_pages(relay, ALL, str(root), 1000)[0]}
            == (set(expected) - {f"{root}/public/run1/a.h5", f"{root}/private/keys/secret"})
            | {f"{root}/public/a.h5"}
        ),
        20,
        "the view after a rename and a delete",
    )

    # Bad input: a clear 400, and the relay goes on.
    for params in ({"limit": "0"}, {"limit": "many"}, {"after": "!!"}, {"path": "rel/x"}):
        r = httpx.get(relay.url + "/state", params=params, headers=relay.headers)
        assert r.status_code == 400 and r.text.strip(), params
    assert httpx.get(relay.url + "/state").status_code == 401  # no token, no view


def test_a_scoped_reader_sees_only_its_part_in_every_view(tmp_path, procs):
    root = tmp_path / "w"
    _tree(root)
    relay = _relay(tmp_path, procs, root)
    wait_for(lambda: len(_all_pages(relay, ALL, str(root), 100)[0]) == 10, 20, "view")
    public = f"{root}/public"

    seen = {e["path"] for e in _all_pages(relay, PUBLIC, "/", 2)[0]}
    assert seen == {
        public,
        f"{public}/run1",
        f"{public}/run1/a.h5",
        f"{public}/run2",
        f"{public}/run2/deep",
        f"{public}/run2/deep/b.h5",
    }

    tail = Tail(
        tmp_path, procs, relay.url, "--since", "snapshot", "--token", PUBLIC, name="tail-pub"
    )
    try:
        got = tail.wait_count(7)
        assert {e["path"] for e in got[:6]} == seen
        assert got[6] == {"id": got[6]["id"], "entries": 6}  # the snapshot: 6 entries, then live
        (root / "private" / "leak").write_bytes(b"x")
        (root / "public" / "new").write_bytes(b"x")
        live = tail.wait_count(9)[7:]
        assert [(e["path"], e["flags"]) for e in live] == [
            (f"{public}/new", ["IN_CREATE"]),
            (f"{public}/new", ["IN_CLOSE_WRITE"]),
        ]
        assert all(e["id"] > got[6]["id"] for e in live)
    finally:
        tail.proc.stop()

    # dCache's listing: the way down to what it may read, and nothing beside it.
    ns = relay.url + "/api/v1/namespace"
    auth = {"Authorization": f"Bearer {PUBLIC}"}
    top = httpx.get(f"{ns}{root}", params={"children": "true"}, headers=auth).json()
    assert [c["fileName"] for c in top["children"]] == ["public"]
    secret = httpx.get(f"{ns}{root}/private/keys", params={"children": "true"}, headers=auth)
    assert secret.status_code == 404


def test_dcacheclient_walks_the_tree_as_panoptes_does(tmp_path, procs):
    """panoptes (``dcache-admin sync --recursive``) lists every directory with
    ``get_file_attributes(path, children=True)`` and descends into each ``fileType == "DIR"``
    by ``fileName`` before it subscribes."""
    from dcacheclient.client import Client

    root = tmp_path / "w"
    _tree(root)
    relay = _relay(tmp_path, procs, root)
    wait_for(lambda: len(_all_pages(relay, ALL, str(root), 100)[0]) == 10, 20, "view")
    dcache = Client(relay.url, username="anyone", password=ALL)  # a token as the password
    try:
        found, todo = [], [str(root)]
        while todo:
            prefix = todo.pop()
            response = dcache.namespace.get_file_attributes(path=prefix, children=True)
            assert response["fileType"] == "DIR"
            for entry in response["children"]:
                if entry["fileType"] == "DIR":
                    directory = os.path.normpath(prefix + "/" + entry["fileName"])
                    found.append(directory)
                    todo.append(directory)
        assert sorted(found) == sorted(
            f"{root}/{d}"
            for d in (
                "public",
                "public/run1",
                "public/run2",
                "public/run2/deep",
                "private",
                "private/keys",
            )
        )
        # Above the agent's root: directories known from what is below them.
        above = dcache.namespace.get_file_attributes(path=str(root.parent), children=True)
        assert [c["fileName"] for c in above["children"]] == [root.name]
        files = dcache.namespace.get_file_attributes(path=f"{root}/public/run1", children=True)
        (a,) = files["children"]
        assert (a["fileName"], a["fileType"], a["fileMimeType"]) == (
            "a.h5",
            "REGULAR",
            "application/octet-stream",
        )
        assert dcache.namespace.get_file_attributes(path=f"{root}/nothing") is False  # (404)
    finally:
        dcache.close()


def test_ada_and_the_reference_client_list_directories_as_they_parse_them(tmp_path, procs):
    """Neither is on a registry (they were run unchanged by hand: docs/namespace.md); their
    requests and parsing, exactly: ada pipes curl with a netrc login into jq, the reference
    client (dcache-sse simple-client.py ``-r``) indexes the JSON with requests."""
    import requests

    root = tmp_path / "w"
    _tree(root)
    relay = _relay(tmp_path, procs, root)
    wait_for(lambda: len(_all_pages(relay, ALL, str(root), 100)[0]) == 10, 20, "view")
    api = relay.url + "/api/v1"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login ada-user password {ALL}\n")
    netrc.chmod(0o600)

    def ada(path: str, jq: str) -> str:
        listing = subprocess.run(
            [
                "curl",
                "-s",
                "--netrc-file",
                str(netrc),
                "-X",
                "GET",
                f"{api}/namespace/{path}?children=true",
            ],
            capture_output=True,
            check=True,
        ).stdout
        return subprocess.run(
            ["jq", "-r", jq], input=listing, capture_output=True, check=True
        ).stdout.decode()

    # get_subdirs, and how ada tells that a path exists
    subdirs = '.children | .[] | if .fileType == "DIR" then .fileName else empty end'
    assert ada(f"{root}/public", subdirs).split() == ["run1", "run2"]
    assert ada(f"{root}/public/run1", 'has("fileType")').strip() == "true"
    assert ada(f"{root}/nothing", 'has("fileType")').strip() == "false"

    # recursive_watch → watch_subdirectories, as simple-client.py builds the URL (not encoded)
    s = requests.Session()
    s.auth = ("reader", ALL)
    seen = []

    def walk(path: str) -> None:
        r = s.get(api + "/namespace" + path + "?children=true")
        r.raise_for_status()
        for item in r.json()["children"]:
            if item["fileType"] == "DIR":
                seen.append(path + "/" + item["fileName"])
                walk(path + "/" + item["fileName"])

    walk(str(root))
    assert sorted(seen) == sorted(
        f"{root}/{d}"
        for d in (
            "public",
            "public/run1",
            "public/run2",
            "public/run2/deep",
            "private",
            "private/keys",
        )
    )


def test_dcache_pyclient_lists_and_describes_unchanged(tmp_path, procs, monkeypatch):
    """SURF's ada rewritten in Python (dcache-pyclient, installed by tests/run without its
    pinned httpx): whoami, list, longlist and stat through the namespace endpoint, with a
    token and with a netrc login."""
    from ada.client import AdaClient

    root = tmp_path / "w"
    _tree(root)
    relay = _relay(tmp_path, procs, root, tls=monkeypatch)  # (it takes https:// only)
    wait_for(lambda: len(_all_pages(relay, ALL, str(root), 100)[0]) == 10, 20, "view")
    api = relay.url + "/api/v1"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login someone password {PUBLIC}\n")
    netrc.chmod(0o600)
    clients = (
        AdaClient(api=api, token=ALL, igtf=False),
        AdaClient(api=api, netrc=str(netrc), igtf=False),
    )
    for client in clients:
        with client:
            assert client.whoami().status == "AUTHENTICATED"
            assert client.list(f"{root}/public") == ["run1/", "run2/"]
            info = client.stat(f"{root}/public/run1/a.h5")
            assert (info.size, info.file_type.value) == (10, "REGULAR")
            assert info.mtime is not None
            assert client.list(f"{root}/public/run2/deep") == ["b.h5"]
            long = client.longlist(f"{root}/public/run1")
            assert [(i.path, i.size) for i in long] == [(f"{root}/public/run1/a.h5", 10)]
