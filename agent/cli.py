"""``storage-events-agent``: the command line of the storage-node agent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from storage_events.cliutil import (
    load_config,
    log_format_option,
    setup_logging,
    token_option,
    version_option,
)
from storage_events.wire import ingest_url

from .config import AgentConfig
from .runner import AgentError, run_agent


@click.group()
@version_option
def main() -> None:
    """Watch directories with inotify and publish every change to a storage-events relay."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file; flags override it.",
)
@click.option("--relay", help="Relay base URL, e.g. http://relay:8808 (default 127.0.0.1:8808).")
@click.option("--site", help="Site name this node belongs to.")
@click.option("--node", help="Node name (default: the short host name).")
@token_option
@click.option(
    "--spool",
    type=click.Path(file_okay=False),
    help="Directory for unacknowledged events and the tree snapshot.",
)
@click.option(
    "--announce-existing/--no-announce-existing",
    default=None,
    help="The first time a root is watched, publish what it holds as IN_CREATE events, so "
    "that the relay's namespace view starts complete (the default: on).",
)
@click.option("-v", "--verbose", count=True, help="More log output.")
@log_format_option
@click.argument("paths", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@version_option
def run(
    config_file: Path | None,
    relay: str | None,
    site: str | None,
    node: str | None,
    token: str | None,
    spool: str | None,
    announce_existing: bool | None,
    verbose: int,
    log_format: str,
    paths: tuple[Path, ...],
) -> None:
    """Watch PATH... (and the config's roots) and publish to the relay."""
    setup_logging(verbose, log_format)
    roots = [{"path": str(p.resolve())} for p in paths]
    cfg = load_config(
        config_file,
        AgentConfig,
        {
            "relay": relay,
            "site": site,
            "node": node,
            "token": token,
            "spool": spool,
            "announce_existing": announce_existing,
        },
    )
    cfg.root.extend(load_config(None, AgentConfig, {"root": roots}).root)
    try:
        ingest_url(cfg.relay)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--relay") from None
    try:
        asyncio.run(run_agent(cfg))
    except AgentError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file to check.",
)
@click.option("--relay", help="Relay base URL to try.")
@click.argument("paths", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@version_option
def check(config_file: Path | None, relay: str | None, paths: tuple[Path, ...]) -> None:
    """Check the config, the relay, the spool and the inotify limits against the trees."""
    from .check import run_check  # httpx is for this command only: keeps `run` small

    cfg = load_config(config_file, AgentConfig, {"relay": relay})
    cfg.root.extend(
        load_config(None, AgentConfig, {"root": [{"path": str(p.resolve())} for p in paths]}).root
    )
    if not run_check(cfg, click.echo):
        raise SystemExit(1)
