"""Relay names on one host: left unset, each relay makes its own and keeps it, so a central
relay and three site relays started alike on one machine federate; two relays given one name
are told so when they link, instead of dropping every event as a loop."""

from __future__ import annotations

import httpx
from conftest import Relay, Tail, agents_connected, start_agent, wait_for
from test_end_to_end import write

from storage_events.relay.config import NAME_FILE


def puller(tmp, procs, name, upstreams, extra: str = "") -> Relay:
    config = tmp / f"{name}.toml"
    lines = [extra, "heartbeat = 1.0"]
    for url in upstreams:
        lines += ["[[upstream]]", f'url = "{url}"', "idle_timeout = 4.0"]
    config.write_text("\n".join(lines) + "\n")
    return Relay(tmp, procs, name=name, extra=("--config", str(config)))


def test_relays_with_default_names_on_one_host_federate(tmp_path, procs):
    sites = [Relay(tmp_path, procs, name=f"site{i}") for i in (1, 2, 3)]
    names = [httpx.get(s.url + "/healthz", timeout=5).json()["relay"] for s in sites]
    assert len(set(names)) == 3  # made per relay, not taken from the host alone
    for i, site in enumerate(sites, 1):
        root = tmp_path / f"w{i}"
        root.mkdir()
        start_agent(tmp_path, procs, site.url, root, site=f"site{i}", name=f"agent{i}")
        wait_for(lambda site=site: agents_connected(site), 10, f"site{i}'s agent")
    central = puller(tmp_path, procs, "central", [s.url for s in sites])
    tail = Tail(tmp_path, procs, central.url, "--since", "earliest")
    for i in (1, 2, 3):
        for n in range(20):
            write(tmp_path / f"w{i}" / f"f{n:02d}")
    events = tail.wait_count(120)
    assert {e["site"] for e in events} == {"site1", "site2", "site3"}
    assert {e["via"][0] for e in events} == set(names)
    # A restart keeps the name (peers' checkpoints and `via` depend on it).
    site = sites[0]
    site.proc.stop()
    site.start()
    assert httpx.get(site.url + "/healthz", timeout=5).json()["relay"] == names[0]
    assert (site.data / NAME_FILE).read_text().strip() == names[0]


def test_two_relays_given_one_name_are_told_when_they_link(tmp_path, procs):
    site = puller(tmp_path, procs, "site", [], extra='name = "same"')
    central = puller(tmp_path, procs, "central", [site.url], extra='name = "same"')
    wait_for(
        lambda: "is also called 'same'" in central.proc.output(),
        20,
        "the central relay saying that its upstream has its name",
    )
    assert "give each relay of a federation its own `name`" in central.proc.output()
