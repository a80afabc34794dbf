"""``GET /metrics``: Prometheus metrics of the relay, read from its parts at scrape time.

Where authentication is configured, only a metrics-role token may scrape, sent as
``Authorization: Bearer`` (Prometheus' ``authorization`` setting). Not a reader token: the
metrics name every site and federation link, which a scoped reader may not know, and a
scraper holding a reader token could read every event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from storage_events.relay.auth import Authenticator, AuthError, article, bearer
from storage_events.relay.dcache.api import ChannelService
from storage_events.relay.federation.pull import Puller
from storage_events.relay.federation.push import Pusher
from storage_events.relay.feed.endpoint import Feed
from storage_events.relay.feed.hub import Hub
from storage_events.relay.ingest.endpoint import Ingest
from storage_events.relay.kafka.sink import KafkaSink
from storage_events.relay.log.base import EventLog


class RelayCollector(Collector):
    def __init__(
        self,
        log: EventLog,
        hub: Hub,
        ingest: Ingest,
        feed: Feed,
        channels: ChannelService,
        pullers: list[Puller],
        pushers: list[Pusher],
        sink: KafkaSink | None = None,
    ) -> None:
        self.log, self.hub, self.ingest, self.feed = log, hub, ingest, feed
        self.channels, self.pullers, self.pushers = channels, pullers, pushers
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "storage_events_relay_events_in", "Events stored since start", value=self.log.stored
        )
        yield CounterMetricFamily(
            "storage_events_relay_commits",
            "Writes of the event log that stored events (events_in / commits: events per write)",
            value=self.log.commits,
        )
        yield CounterMetricFamily(
            "storage_events_relay_events_out",
            "Events delivered to subscribers since start",
            value=self.feed.delivered,
        )
        yield CounterMetricFamily(
            "storage_events_relay_subscriber_overflows",
            "Times a subscriber fell a buffer behind and was switched to reading the log",
            value=self.hub.overflows,
        )
        yield GaugeMetricFamily(
            "storage_events_relay_subscribers", "Connected SSE subscribers", value=len(self.hub)
        )
        yield GaugeMetricFamily(
            "storage_events_relay_log_head", "Newest event id", value=self.log.head
        )
        yield GaugeMetricFamily(
            "storage_events_relay_log_first", "Oldest event id held", value=self.log.first
        )
        yield GaugeMetricFamily(
            "storage_events_relay_log_bytes", "Bytes of event data held", value=self.log.size
        )
        yield GaugeMetricFamily(
            "storage_events_relay_store_ok",
            "1 while the event log can store, 0 while it cannot (/healthz says why)",
            value=int(self.ingest.store_error is None),
        )
        lag = GaugeMetricFamily(
            "storage_events_relay_lag_seconds",
            "Age of the newest event stored, by site (agent clock)",
            labels=["site"],
        )
        now = time.time_ns()
        for site, ts in sorted(self.ingest.last_ts.items()):
            lag.add_metric([site], max(0.0, (now - ts) / 1e9))
        yield lag
        agents = GaugeMetricFamily(
            "storage_events_relay_agent_connections", "Ingest connections, by site", labels=["site"]
        )
        for site, n in sorted(self.ingest.by_site.items()):
            agents.add_metric([site], n)
        yield agents
        yield GaugeMetricFamily(
            "storage_events_relay_channels",
            "dCache API channels",
            value=len(self.channels.registry.channels),
        )
        yield GaugeMetricFamily(
            "storage_events_relay_channel_clients",
            "Clients connected to dCache API channel streams",
            value=len(self.channels.streams),
        )
        up = GaugeMetricFamily(
            "storage_events_relay_upstream_connected",
            "1 while the feed of an upstream relay is being pulled",
            labels=["upstream"],
        )
        taken = GaugeMetricFamily(
            "storage_events_relay_upstream_checkpoint",
            "The upstream's id of the last event taken from it",
            labels=["upstream"],
        )
        for p in self.pullers:
            up.add_metric([p.name], int(p.connected))
            taken.add_metric([p.name], p.checkpoint)
        yield up
        yield taken
        push = GaugeMetricFamily(
            "storage_events_relay_push_connected",
            "1 while pushing to another relay",
            labels=["target"],
        )
        acked = GaugeMetricFamily(
            "storage_events_relay_push_acked",
            "The last of our ids the other relay holds",
            labels=["target"],
        )
        for q in self.pushers:
            push.add_metric([q.cfg.url], int(q.connected))
            acked.add_metric([q.cfg.url], q.position)
        yield push
        yield acked
        relays = GaugeMetricFamily(
            "storage_events_relay_pushing_relays",
            "Connections of relays pushing to this one",
            labels=["relay"],
        )
        for name, n in sorted(self.ingest.relays.items()):
            relays.add_metric([name], n)
        yield relays
        yield CounterMetricFamily(
            "storage_events_relay_federation_loops",
            "Events dropped because they had already passed through this relay (a federation loop)",
            value=self.ingest.looped,
        )
        yield CounterMetricFamily(
            "storage_events_relay_channel_events",
            "Events added to dCache API channel backlogs since start",
            value=self.channels.routed,
        )
        if self.sink is not None:
            yield from self._kafka(self.sink)

    def _kafka(self, sink: KafkaSink) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "storage_events_relay_kafka_connected",
            "1 while the Kafka sink delivers (0 after a client error, until the next delivery)",
            value=int(sink.connected),
        )
        yield GaugeMetricFamily(
            "storage_events_relay_kafka_lag",
            "Ids stored and not yet known to be on the Kafka topic",
            value=sink.lag,
        )
        yield GaugeMetricFamily(
            "storage_events_relay_kafka_checkpoint",
            "The last id the Kafka sink knows delivered, with everything before it",
            value=sink.progress.checkpoint,
        )
        yield CounterMetricFamily(
            "storage_events_relay_kafka_delivered",
            "Messages the Kafka producer reported delivered since start",
            value=sink.delivered,
        )
        yield CounterMetricFamily(
            "storage_events_relay_kafka_lost",
            "Events retention dropped before the Kafka sink published them (announced on the "
            "topic by an overflow event)",
            value=sink.lost,
        )
        yield CounterMetricFamily(
            "storage_events_relay_kafka_rewinds",
            "Failed deliveries that sent the Kafka sink back to its checkpoint",
            value=sink.rewinds,
        )


MAKE_ONE = "make one with `storage-events-relay token --role metrics`"


def refusal(auth: Authenticator, request: Request) -> Response | None:
    """Why the caller may not scrape, as the response to give; None: it may."""
    if not auth.enabled:
        return None  # no authentication configured: loopback only, open as everything else
    token = bearer(request.headers.get("authorization", ""), None)
    if token is None:
        return PlainTextResponse(
            "this relay's /metrics needs a metrics token, sent as "
            f"`Authorization: Bearer TOKEN`; {MAKE_ONE}\n",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        who = auth.identify(token)
    except AuthError as e:
        return PlainTextResponse(
            f"{e}\n", status_code=e.status, headers={"WWW-Authenticate": "Bearer"}
        )
    if who is not None and who.role != "metrics":
        return PlainTextResponse(
            f"token {who.name!r} is {article(who.role)} token: /metrics "
            f"needs a metrics token; {MAKE_ONE}\n",
            status_code=403,
        )
    return None


def metrics_endpoint(
    log: EventLog,
    hub: Hub,
    ingest: Ingest,
    feed: Feed,
    channels: ChannelService,
    pullers: list[Puller],
    pushers: list[Pusher],
    auth: Authenticator,
    sink: KafkaSink | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    registry = CollectorRegistry()
    registry.register(RelayCollector(log, hub, ingest, feed, channels, pullers, pushers, sink))

    async def endpoint(request: Request) -> Response:
        refused = refusal(auth, request)
        if refused is not None:
            return refused
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return endpoint
