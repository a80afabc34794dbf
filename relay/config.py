"""The relay's configuration file (TOML), as a typed struct."""

from __future__ import annotations

import ipaddress
import re
import secrets
import socket
from pathlib import Path
from typing import Annotated

import msgspec

from storage_events.relay.auth import JWTConfig, TokenConfig, UserConfig
from storage_events.wire import MAX_BATCH

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


RelayName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class UpstreamConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A relay whose feed this one pulls (``[[upstream]]``)."""

    url: str  # its base URL, http(s)://host:port
    name: RelayName | None = None  # names its checkpoint and its log lines; default: from url
    token: str | None = None  # a reader token of that relay
    idle_timeout: Positive = 45.0  # reconnect when nothing, not even a heartbeat, came for this
    # long (3 heartbeats at the default 15 s): a link that died silently is noticed
    ca_file: str | None = None  # to check its TLS certificate (default: the system's CAs)
    # Seconds before a feed that broke the protocol (an event that is not one, a line beyond
    # the limit) is pulled again: it would most likely send the same.
    broken_feed_retry: Positive = 60.0

    def __post_init__(self) -> None:
        _check_url(self.url)

    @property
    def label(self) -> str:
        """Its name, or one made from the URL's host and port (names are checkpoint keys and
        appear in events as a site name, so they keep to the same letters)."""
        where = self.url.split("://", 1)[-1].rstrip("/")
        return self.name or re.sub(r"[^A-Za-z0-9._-]", "_", where)[:64]


class PushConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A relay this one pushes its whole log to (``[[push]]``), over its /ingest."""

    url: str
    token: str | None = None  # a relay-role token of that relay
    ca_file: str | None = None

    def __post_init__(self) -> None:
        _check_url(self.url)


def _check_url(url: str) -> None:
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) < 1:
        raise ValueError(f"relay URL {url!r} must be http://HOST:PORT or https://HOST:PORT")


KafkaValue = str | int | float | bool
# librdkafka settings the sink's guarantee rests on, or that it sets itself.
KAFKA_FIXED = {
    "bootstrap.servers": "give it as bootstrap_servers",
    "enable.idempotence": "the sink's per-stream order and at-least-once rest on it",
    "acks": "the sink needs acks=all",
    "request.required.acks": "the sink needs acks=all",
    "transactional.id": "the sink does not use transactions",
    "error_cb": "the sink sets it",
    "on_delivery": "the sink sets it",
    "logger": "the sink sets it",
    "delivery.report.only.error": "the sink's checkpoint moves on delivery reports",
}


class KafkaConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every stored event, as a message on a Kafka topic (``[kafka]``)."""

    bootstrap_servers: str  # host:port[,host:port…]
    topic: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "storage-events"
    config: dict[str, KafkaValue] = {}  # [kafka.config]: passed to the producer as it is

    def __post_init__(self) -> None:
        servers = [s.strip() for s in self.bootstrap_servers.split(",")]
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(
                    f"kafka bootstrap server {server!r} must be HOST:PORT "
                    "(several: HOST:PORT,HOST:PORT)"
                )
        for key in self.config:
            if key in KAFKA_FIXED:
                raise ValueError(f"[kafka.config] cannot set {key!r}: {KAFKA_FIXED[key]}")

    def producer(self) -> dict[str, KafkaValue]:
        """The producer's settings: ours, then [kafka.config] over them."""
        return {
            "linger.ms": 5,
            "compression.type": "lz4",
            # A message not delivered within this fails, and the sink sends again from its
            # checkpoint with a new producer (after saying why in the log).
            "message.timeout.ms": 60_000,
            "client.id": "storage-events-relay",
            **self.config,
            "bootstrap.servers": ",".join(s.strip() for s in self.bootstrap_servers.split(",")),
            "enable.idempotence": True,
            "acks": "all",
        }


class RelayConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:8808"
    # Unique in a federation: stamped on every event this relay stores (`via`), which is how
    # loops are found.
    # loops are found. Default: made once, from the host name and a random suffix, and kept in
    # the data directory (see own_name), so that relays on one host never share one.
    name: RelayName | None = None
    data: str = "storage-events-data"  # directory of the embedded SQLite log (and channels)
    # nats://HOST:PORT[,nats://…]: the event log on a NATS JetStream stream instead, shared by
    # every relay given the same servers and stream (scale-out).
    store: str | None = None
    nats_stream: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "STORAGE_EVENTS"
    # Copies of the stream JetStream keeps (default: the cluster's size, up to 3).
    nats_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] | None = None
    # Serving anonymous agents and readers on a non-loopback address needs this, explicitly.
    insecure: bool = False
    heartbeat: Positive = 15.0  # seconds between SSE heartbeat comments on an idle feed
    max_frame: PositiveInt = 16 * 1024 * 1024  # largest ingest WebSocket message, bytes
    max_batch: Annotated[int, msgspec.Meta(gt=0, le=MAX_BATCH)] = MAX_BATCH  # most events in
    # one ingest batch
    subscriber_buffer: PositiveInt = 4 * 1024 * 1024  # bytes queued per subscriber before it
    # falls back to reading the log
    durability: Annotated[str, msgspec.Meta(pattern="^(normal|full)$")] = "normal"
    # Keep the namespace view (GET /state, since=snapshot, dCache's namespace listing): every
    # event also changes its tables, in the same transaction.
    namespace: bool = True
    # Retention of the log; 0 means no limit of that kind. Clients resuming from an id that
    # was dropped get a `gap` event saying which ids they missed.
    retention_days: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    retention_events: Annotated[int, msgspec.Meta(ge=0)] = 0
    retention_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    retention_check: Positive = 10.0  # seconds between retention passes
    certfile: str | None = None  # TLS: serve https:// and wss://
    keyfile: str | None = None
    cors_origins: list[str] = []  # web origins whose pages may read the feed, e.g. https://x
    token: list[TokenConfig] = []  # [[token]] entries, made by `storage-events-relay token`
    jwt: JWTConfig | None = None  # readers may also present JWTs checked with this
    user: list[UserConfig] = []  # [[user]]: readers logging in with HTTP Basic (`user add`)
    max_subscribers_per_identity: PositiveInt = 64
    # Slow or idle clients: a request head (and a WebSocket's hello) must arrive within this
    # many seconds, and at most this many connections are served at once (beyond: HTTP 503).
    request_head_timeout: Positive = 10.0
    max_connections: PositiveInt = 10_000
    # Host names (or IP addresses) clients may reach this relay by; checked on the anonymous
    # loopback default against DNS rebinding. Empty: loopback names only when anonymous, any
    # name when tokens are configured (put a reverse proxy's public name here to check it too).
    allowed_hosts: list[str] = []
    # dCache-compatible channels (/api/v1/events), with dCache's defaults.
    channels_per_user: PositiveInt = 128
    channel_timeout: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 300  # s without a client
    channel_backlog: PositiveInt = 16383  # events kept per channel for reconnecting clients
    upstream: list[UpstreamConfig] = []  # relays whose feeds this one pulls
    push: list[PushConfig] = []  # relays this one pushes its log to
    kafka: KafkaConfig | None = None  # a topic every stored event is published to

    def nats_servers(self) -> list[str]:
        servers = [s.strip() for s in (self.store or "").split(",") if s.strip()]
        for server in servers:
            if not server.startswith(("nats://", "tls://")):
                raise ValueError(f"store {server!r}: give NATS servers as nats://HOST:PORT")
        return servers

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"listen address {self.listen!r} must be HOST:PORT")
        return host.strip("[]") or "0.0.0.0", int(port)


def _hostname() -> str:
    name = socket.gethostname().split(".")[0]
    return name if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,56}$", name) else "relay"


NAME_FILE = "relay-name"


def own_name(data: Path) -> str:
    """This relay's default name: ``<host>-<6 hex>``, made at its first start and kept in
    ``data``; raises ``OSError`` (naming the file) when it can be neither read nor written."""
    path = data / NAME_FILE
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        name = f"{_hostname()}-{secrets.token_hex(3)}"
        data.mkdir(parents=True, exist_ok=True)
        path.write_text(name + "\n")
        return name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise OSError(f"{path} holds {name[:80]!r}, not a relay name: delete it to get a new one")
    return name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_secure(cfg: RelayConfig) -> None:
    """Secure by default: with no authentication configured, serve loopback only."""
    host, _ = cfg.host_port()
    if not is_loopback(host) and not cfg.insecure and not (cfg.token or cfg.jwt or cfg.user):
        raise ValueError(
            f"refusing to listen on {host}: no authentication is configured, so anyone who can "
            "reach this address could publish and read events. Listen on 127.0.0.1, configure "
            "tokens, or pass --insecure if this network is trusted."
        )
