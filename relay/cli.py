"""``storage-events-relay``: the command line of the relay."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import click
import msgspec

from storage_events.cliutil import (
    load_config,
    log_format_option,
    setup_logging,
    version_option,
)
from storage_events.relay.config import KafkaConfig, RelayConfig, UpstreamConfig, check_secure


@click.group()
@version_option
def main() -> None:
    """Merge the events of storage agents into one Server-Sent Events feed."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file; flags override it.",
)
@click.option("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8808).")
@click.option("--data", help="Directory of the embedded event log (SQLite).")
@click.option(
    "--store",
    metavar="nats://HOST:PORT[,…]",
    help="Keep the event log on a NATS JetStream stream instead (scale-out).",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Allow a non-loopback address without authentication.",
)
@click.option("--certfile", help="TLS certificate (PEM): serve https:// and wss://.")
@click.option("--keyfile", help="TLS private key (PEM).")
@click.option("--name", help="This relay's name, unique in a federation (default: host name).")
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="URL",
    help="Pull (federate) the feed of another relay; repeatable. [[upstream]] in "
    "the config also takes a token.",
)
@click.option(
    "--kafka",
    metavar="HOST:PORT[,…]",
    help="Publish every stored event to Kafka (bootstrap servers); [kafka] in the config "
    "also takes producer settings.",
)
@click.option("--kafka-topic", metavar="NAME", help="The Kafka topic (default storage-events).")
@click.option("-v", "--verbose", count=True, help="More log output.")
@log_format_option
@version_option
def serve(
    config_file: Path | None,
    listen: str | None,
    data: str | None,
    store: str | None,
    insecure: bool | None,
    certfile: str | None,
    keyfile: str | None,
    name: str | None,
    upstreams: tuple[str, ...],
    kafka: str | None,
    kafka_topic: str | None,
    verbose: int,
    log_format: str,
) -> None:
    """Run the relay: /ingest for agents, /events for subscribers."""
    setup_logging(verbose, log_format)
    cfg = load_config(
        config_file,
        RelayConfig,
        {
            "listen": listen,
            "data": data,
            "insecure": insecure,
            "certfile": certfile,
            "keyfile": keyfile,
            "name": name,
            "store": store,
        },
    )
    try:
        cfg.upstream = [*cfg.upstream, *(UpstreamConfig(url=u) for u in upstreams)]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--upstream") from None
    cfg.kafka = kafka_config(cfg.kafka, kafka, kafka_topic)
    if cfg.kafka is not None:
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            raise click.ClickException(
                "publishing to Kafka needs confluent-kafka: pip install 'storage-events[kafka]'"
            ) from None
    try:
        check_secure(cfg)  # also checks the listen address, which server_config() takes apart
    except ValueError as e:
        raise click.ClickException(str(e)) from None

    try:
        import uvicorn
        import uvloop

        from storage_events.relay.app import create_app
        from storage_events.relay.edge.server import server_config
        from storage_events.relay.log.base import StoreError
    except ImportError as e:
        raise click.ClickException(
            f"the relay needs its extra dependencies ({e.name} is missing): "
            "pip install 'storage-events[relay]'"
        ) from None
    try:
        app = create_app(cfg)
    except (OSError, sqlite3.Error, StoreError) as e:
        raise click.ClickException(f"cannot start: {e}") from None
    except ValueError as e:
        raise click.ClickException(f"config: {e}") from None
    server = uvicorn.Server(server_config(app, cfg, verbose=verbose))
    stop = server.handle_exit

    def handle_exit(sig: int, frame: object) -> None:
        # SSE responses never end by themselves: tell every subscriber to reconnect (it resumes
        # by Last-Event-ID) so the server can stop without waiting for them.
        app.state.hub.close()
        app.state.channels.close()
        stop(sig, frame)  # type: ignore[arg-type]

    server.handle_exit = handle_exit  # type: ignore[method-assign]

    async def serve() -> None:
        # The log opens on the server's loop (a shared store's connection lives there), and
        # before anything listens: a store that cannot be used is an error, not a 503.
        await app.state.log.start()
        if app.state.follower is not None:
            await app.state.follower.start()
        if app.state.sink is not None:
            try:
                await app.state.sink.start()
            except Exception as e:  # a damaged checkpoint; KafkaException: a bad setting
                raise StoreError(f"Kafka sink: {e}") from None
        await server.serve()

    try:
        # uvloop: the relay's cost is per frame and per connection, most of it in the event
        # loop's own transports and selector (measured: bench/scale_bench.py).
        uvloop.run(serve())
    except StoreError as e:
        raise click.ClickException(f"cannot start: {e}") from None


def kafka_config(
    cfg: KafkaConfig | None, servers: str | None, topic: str | None
) -> KafkaConfig | None:
    """[kafka] with --kafka and --kafka-topic over it."""
    if servers is None and topic is None:
        return cfg
    if servers is None and cfg is None:
        raise click.BadParameter(
            "give the brokers too: --kafka HOST:PORT (or [kafka] bootstrap_servers in the config)",
            param_hint="--kafka-topic",
        )
    try:
        return msgspec.convert(
            {
                "bootstrap_servers": servers or cfg.bootstrap_servers,
                "topic": topic or (cfg.topic if cfg else "storage-events"),
                "config": cfg.config if cfg else {},
            },
            KafkaConfig,
        )
    except msgspec.ValidationError as e:
        raise click.BadParameter(str(e), param_hint="--kafka/--kafka-topic") from None


def toml_fields(entry: msgspec.Struct) -> str:
    """An entry's fields as TOML lines (JSON strings and string arrays are valid TOML)."""
    return "\n".join(
        f"{k} = {msgspec.json.encode(v).decode()}"
        for k, v in msgspec.to_builtins(entry).items()
        if v is not None
    )


@main.command()
@click.option("--name", required=True, help="Who or what the token is for (shown in logs).")
@click.option(
    "--role",
    type=click.Choice(["agent", "reader", "relay", "metrics"]),
    required=True,
    help="agent: publishes one site; reader: reads; relay: a relay pushing its feed; "
    "metrics: scrapes /metrics (Prometheus), nothing else.",
)
@click.option(
    "--site",
    help="agent: the site it publishes as; relay: the name of the relay "
    "that pushes with it (required for both).",
)
@click.option(
    "--sites",
    multiple=True,
    help="reader: a site it may read (repeat; default all); relay: a site it may push "
    "events of (repeat; default: only its own --site).",
)
@click.option(
    "--paths", multiple=True, help="reader: a path prefix it may read (repeat; default all)."
)
@click.option(
    "--node", help="agent: the one node it may publish as (default: any node of its site)."
)
@version_option
def token(
    name: str,
    role: str,
    site: str | None,
    sites: tuple[str, ...],
    paths: tuple[str, ...],
    node: str | None,
) -> None:
    """Make a token: prints it once, and the [[token]] entry (with its hash) for the config."""

    from storage_events.relay.auth import (
        FIELD_ROLES,
        NAME_PATTERN,
        TokenConfig,
        hash_token,
        new_token,
    )
    from storage_events.relay.feed.filters import FilterError, normalize_prefix

    given = {"site": site, "sites": sites, "paths": paths, "node": node}
    for option, value in given.items():
        roles, what = FIELD_ROLES[option]
        if value and role not in roles:
            raise click.UsageError(
                f"{role} tokens take no --{option} ({what}; {' and '.join(roles)} tokens only)"
            )
    if role in ("agent", "relay") and not site:
        raise click.BadParameter(f"{role} tokens need --site", param_hint="--site")
    for kind, value in (("site", site), ("node", node)):
        if value is not None and not re.match(NAME_PATTERN, value):
            raise click.BadParameter(
                f"{value!r} is not a valid {kind} name: use letters, "
                "digits, '.', '_' or '-', at most 64, starting with a "
                "letter or digit",
                param_hint=f"--{kind}",
            )
    try:
        prefixes = [normalize_prefix(p) for p in paths]
    except FilterError as e:
        raise click.BadParameter(str(e), param_hint="--paths") from None
    secret = new_token()
    entry = TokenConfig(
        name=name,
        role=role,
        hash=hash_token(secret),  # type: ignore[arg-type]
        site=site,
        sites=list(sites) or None,
        paths=prefixes or None,
        node=node,
    )
    click.echo(
        f"token: {secret}\n\n# Add to the relay config; only the hash is kept there:\n"
        f"[[token]]\n{toml_fields(entry)}"
    )


@main.group()
def user() -> None:
    """Readers logging in with a user name and password (HTTP Basic, as dCache's clients do)."""


@user.command("add")
@click.argument("name")
@click.option("--sites", multiple=True, help="A site it may read (repeat; default all).")
@click.option("--paths", multiple=True, help="A path prefix it may read (repeat; default all).")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from standard input (its first line) instead of asking for it.",
)
@version_option
def user_add(name: str, sites: tuple[str, ...], paths: tuple[str, ...], password_stdin: bool):
    """Make a [[user]] entry for NAME: prints it, with a salted scrypt hash of the password,
    for the relay config (the password itself is kept nowhere)."""
    import sys

    from storage_events.relay.auth import UserConfig, hash_password
    from storage_events.relay.feed.filters import FilterError, normalize_prefix

    try:
        prefixes = [normalize_prefix(p) for p in paths]
    except FilterError as e:
        raise click.BadParameter(str(e), param_hint="--paths") from None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        raise click.BadParameter("use at least 8 characters", param_hint="password")
    try:
        entry = msgspec.convert(
            {
                "name": name,
                "hash": hash_password(password),
                "sites": list(sites) or None,
                "paths": prefixes or None,
            },
            UserConfig,
        )
    except msgspec.ValidationError as e:
        raise click.BadParameter(
            f"{name!r} cannot be a user name ({e}): use letters, digits, '.', '_', '@' or '-', "
            "at most 64, starting with a letter or digit",
            param_hint="NAME",
        ) from None
    click.echo(f"# Add to the relay config:\n[[user]]\n{toml_fields(entry)}")
