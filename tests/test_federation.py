"""Federation with real relays on several hosts: sites merged into one central feed, a site cut
off and healed, a chain of hops, two routes to the same events, and a loop."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from conftest import Relay, Tail, agents_connected, free_port, start_agent, wait_for
from netns import Hosts
from test_end_to_end import write

from storage_events.relay.auth import hash_token


def config(
    path: Path,
    name: str,
    *,
    tokens: list[tuple[str, str, str, str | None]] = (),
    upstream: list[tuple[str, str | None]] = (),
    push: list[tuple[str, str]] = (),
    extra: str = "",
) -> Path:
    """A relay config: tokens (name, role, secret, site), upstreams (url, token), pushes."""
    lines = [f'name = "{name}"', "heartbeat = 1.0", extra]
    for tname, role, secret, site in tokens:
        lines += [
            "[[token]]",
            f'name = "{tname}"',
            f'role = "{role}"',
            f'hash = "{hash_token(secret)}"',
        ]
        if role in ("agent", "relay"):  # the site it publishes as; a relay's own name
            lines.append(f'site = "{site}"')
        if role != "agent" and site:
            lines.append(f'sites = ["{site}"]')
    for url, token in upstream:
        lines += ["[[upstream]]", f'url = "{url}"', "idle_timeout = 4.0"]
        if token:
            lines.append(f'token = "{token}"')
    for url, token in push:
        lines += ["[[push]]", f'url = "{url}"', f'token = "{token}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def check_once_in_order(events: list[dict]) -> None:
    keys = Counter((e["stream"], e["seq"]) for e in events)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1][:5]
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))
    by_stream: dict[str, list[int]] = defaultdict(list)
    for e in events:
        by_stream[e["stream"]].append(e["seq"])
    for stream, seqs in by_stream.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{stream}: gaps or disorder"


def test_three_sites_merge_into_one_central_feed_through_a_cut(tmp_path, procs):
    hosts = Hosts(["central", "site1", "site2", "site3"])
    try:
        secrets = {
            n: f"secret-{n}-0123456789abcdef"
            for n in ("tester", "pull", "push3", "agent1", "agent2", "agent3")
        }
        sites: dict[str, Relay] = {}
        for i in (1, 2, 3):
            site = f"site{i}"
            tokens = [
                (f"agent{i}", "agent", secrets[f"agent{i}"], site),
                ("central", "reader", secrets["pull"], None),
            ]
            push = []
            if i == 3:  # site3 pushes instead of being pulled
                central_url = f"http://{hosts.addr['central']}:8808"
                push = [(central_url, secrets["push3"])]
            cfg = config(tmp_path / f"{site}.toml", site, tokens=tokens, push=push)
            sites[site] = Relay(
                tmp_path,
                procs,
                name=site,
                host=hosts.addr[site],
                netns=hosts.exec(site),
                extra=("--config", str(cfg)),
                token=secrets["pull"],
            )
        central_cfg = config(
            tmp_path / "central.toml",
            "central",
            tokens=[
                ("tester", "reader", secrets["tester"], None),
                ("site3-relay", "relay", secrets["push3"], "site3"),
            ],
            upstream=[(sites["site1"].url, secrets["pull"]), (sites["site2"].url, secrets["pull"])],
        )
        central = Relay(
            tmp_path,
            procs,
            name="central",
            host=hosts.addr["central"],
            netns=hosts.exec("central"),
            extra=("--config", str(central_cfg)),
            port=8808,
        )  # site3's config names it
        roots = {}
        for i in (1, 2, 3):
            site = f"site{i}"
            roots[site] = tmp_path / site
            roots[site].mkdir()
            start_agent(
                tmp_path,
                procs,
                sites[site].url,
                roots[site],
                site=site,
                node=f"node{i}",
                name=f"agent{i}",
                netns=hosts.exec(site),
                extra=("--token", secrets[f"agent{i}"]),
            )
        for site in sites.values():
            wait_for(lambda s=site: agents_connected(s), 15, "agents connected")
        tail = Tail(
            tmp_path, procs, central.url, "--since", "earliest", "--token", secrets["tester"]
        )

        for n in range(100):
            for site, root in roots.items():
                write(root / f"{site}-a{n:03d}")
        events = tail.wait_count(600)
        check_once_in_order(events)
        assert Counter(e["site"] for e in events) == {"site1": 200, "site2": 200, "site3": 200}
        for e in events:  # origin kept: the site relay's id, and the way the event came
            assert e["via"] == [e["site"], "central"]
            assert isinstance(e["origin_id"], int) and e["origin_id"] >= 1
        summary = httpx.get(
            central.url + "/sites",
            timeout=5,
            headers={"Authorization": f"Bearer {secrets['tester']}"},
        ).json()
        assert [(s["site"], s["via"]) for s in summary["sites"]] == [
            ("site1", "site1"),
            ("site2", "site2"),
            ("site3", "site3"),
        ]
        assert all(u["connected"] for u in summary["upstreams"])
        assert summary["pushing_here"] == {"site3": 1}

        # site1 (pulled) and site3 (pushing) are cut off for 30 s while their agents keep
        # writing; site2 carries on meanwhile.
        hosts.cut("site1")
        hosts.cut("site3")
        cut_at = time.monotonic()
        for n in range(100):
            write(roots["site1"] / f"site1-b{n:03d}")
            write(roots["site3"] / f"site3-b{n:03d}")
        for n in range(50):
            write(roots["site2"] / f"site2-b{n:03d}")
        during = tail.wait_count(700, timeout=25)  # site2's arrive while the others are cut
        assert Counter(e["site"] for e in during) == {"site1": 200, "site2": 300, "site3": 200}
        time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
        hosts.heal("site1")
        hosts.heal("site3")
        events = tail.wait_count(1100, timeout=60)
        time.sleep(2)
        events = tail.events()
        check_once_in_order(events)
        assert Counter(e["site"] for e in events) == {"site1": 400, "site2": 300, "site3": 400}
    finally:
        for p in reversed(procs):
            p.stop(timeout=10)
        hosts.close()


def test_a_chain_two_routes_and_a_loop(tmp_path, procs):
    """a (with an agent) ← b ← c, d pulls both a and b, and a pulls c: a loop a → b → c → a."""
    hosts = {n: f"127.0.0.{i}" for i, n in enumerate("abcd", 2)}
    ports = {n: free_port() for n in "abcd"}
    pulls = {"a": ["c"], "b": ["a"], "c": ["b"], "d": ["a", "b"]}
    relays = {}
    for n in "abcd":
        cfg = config(
            tmp_path / f"{n}.toml",
            n,
            upstream=[(f"http://{hosts[u]}:{ports[u]}", None) for u in pulls[n]],
        )
        relays[n] = Relay(
            tmp_path, procs, name=n, host=hosts[n], port=ports[n], extra=("--config", str(cfg))
        )
    root = tmp_path / "w"
    root.mkdir()
    start_agent(tmp_path, procs, relays["a"].url, root, site="s")
    for i in range(50):
        write(root / f"f{i:02d}")
    for n in "abcd":
        wait_for(lambda n=n: relays[n].healthy()["head"] >= 100, 30, f"relay {n} has all")
    time.sleep(3)  # time for anything to come round again
    for n in "abcd":
        assert relays[n].healthy()["head"] == 100, n  # each event stored once everywhere
    c = Tail(tmp_path, procs, relays["c"].url, "--since", "earliest", name="tail-c")
    events = c.wait_count(100)
    check_once_in_order(events)
    assert {tuple(e["via"]) for e in events} == {("a", "b", "c")}
    d = Tail(tmp_path, procs, relays["d"].url, "--since", "earliest", name="tail-d")
    check_once_in_order(d.wait_count(100))
    assert "federation loop: upstream" in relays["a"].proc.output()
    metrics = httpx.get(relays["a"].url + "/metrics", timeout=5).text
    assert "storage_events_relay_federation_loops_total 100.0" in metrics
