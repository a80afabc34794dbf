"""The command lines as an operator meets them: help, version, config errors, secure defaults."""

from __future__ import annotations

import subprocess

import pytest
from conftest import command, free_port

from storage_events import __version__

COMMANDS = [
    ("storage-events", ["tail"]),
    ("storage-events-agent", ["run"]),
    ("storage-events-relay", ["serve"]),
]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("name", "sub"), COMMANDS)
def test_help_and_version(name, sub):
    for args in ([], sub):
        r = run(command(name), *args, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout
        r = run(command(name), *args, "--version")
        assert r.returncode == 0 and __version__ in r.stdout


def test_relay_refuses_a_public_address_without_auth(tmp_path):
    r = run(
        command("storage-events-relay"),
        "serve",
        "--listen",
        f"0.0.0.0:{free_port()}",
        "--data",
        str(tmp_path / "d"),
    )
    assert r.returncode != 0
    assert "refusing to listen on 0.0.0.0" in r.stderr and "--insecure" in r.stderr


def test_relay_reports_config_errors_by_file_and_key(tmp_path):
    bad = tmp_path / "relay.toml"
    bad.write_text("listen = 8808\n")
    r = run(command("storage-events-relay"), "serve", "--config", str(bad))
    assert r.returncode != 0 and str(bad) in r.stderr and "$.listen" in r.stderr
    bad.write_text('listne = "127.0.0.1:1"\n')
    r = run(command("storage-events-relay"), "serve", "--config", str(bad))
    assert r.returncode != 0 and "unknown field `listne`" in r.stderr
    bad.write_text('listen = "127.0.0.1:1\n')
    r = run(command("storage-events-relay"), "serve", "--config", str(bad))
    assert r.returncode != 0 and "not valid TOML" in r.stderr


def test_agent_config_file_and_flags(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('relay = "ftp://nowhere"\nsite = "s"\n[[root]]\npath = "/tmp"\n')
    r = run(command("storage-events-agent"), "run", "--config", str(cfg))
    assert r.returncode != 0 and "must start with http:// or https://" in r.stderr
    r = run(command("storage-events-agent"), "run", "--site", "bad site!", str(tmp_path))
    assert r.returncode != 0 and "$.site" in r.stderr


def test_agent_with_nothing_to_watch_says_so(tmp_path):
    r = run(
        command("storage-events-agent"),
        "run",
        "--relay",
        "http://127.0.0.1:9",
        str(tmp_path / "missing"),
    )
    assert r.returncode != 0
    assert "missing is not a directory" in r.stderr and "nothing to watch" in r.stderr


def test_json_logs_for_log_collectors(tmp_path, procs):
    import json

    from conftest import Relay, start_agent, wait_for

    relay = Relay(tmp_path, procs, extra=("--log-format", "json"))
    agent = start_agent(tmp_path, procs, relay.url, tmp_path, extra=("--log-format", "json"))
    wait_for(lambda: "connected to" in agent.output(), 10, "the agent to connect")
    for proc in (relay.proc, agent):
        lines = [line for line in proc.output().splitlines() if line.strip()]
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(
        e["logger"].startswith("uvicorn") for e in map(json.loads, relay.proc.output().splitlines())
    )
