"""``GET /metrics``: Prometheus metrics of the relay, read from its parts at scrape time."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from .dcache_api import ChannelService
from .feed import Feed
from .hub import Hub
from .ingest import Ingest
from .log import EventLog
from .push import Pusher
from .upstream import Puller


class RelayCollector(Collector):
    def __init__(self, log: EventLog, hub: Hub, ingest: Ingest, feed: Feed,
                 channels: ChannelService, pullers: list[Puller],
                 pushers: list[Pusher]) -> None:
        self.log, self.hub, self.ingest, self.feed = log, hub, ingest, feed
        self.channels, self.pullers, self.pushers = channels, pullers, pushers

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("storage_events_relay_events_in",
                                  "Events stored since start", value=self.log.stored)
        yield CounterMetricFamily("storage_events_relay_events_out",
                                  "Events delivered to subscribers since start",
                                  value=self.feed.delivered)
        yield CounterMetricFamily("storage_events_relay_subscriber_overflows",
                                  "Times a subscriber fell a buffer behind and was switched "
                                  "to reading the log", value=self.hub.overflows)
        yield GaugeMetricFamily("storage_events_relay_subscribers", "Connected SSE subscribers",
                                value=len(self.hub))
        yield GaugeMetricFamily("storage_events_relay_log_head", "Newest event id",
                                value=self.log.head)
        yield GaugeMetricFamily("storage_events_relay_log_first", "Oldest event id held",
                                value=self.log.first)
        yield GaugeMetricFamily("storage_events_relay_log_bytes", "Bytes of event data held",
                                value=self.log.size)
        lag = GaugeMetricFamily("storage_events_relay_lag_seconds",
                                "Age of the newest event stored, by site (agent clock)",
                                labels=["site"])
        now = time.time_ns()
        for site, ts in sorted(self.ingest.last_ts.items()):
            lag.add_metric([site], max(0.0, (now - ts) / 1e9))
        yield lag
        agents = GaugeMetricFamily("storage_events_relay_agent_connections",
                                   "Ingest connections, by site", labels=["site"])
        for site, n in sorted(self.ingest.by_site.items()):
            agents.add_metric([site], n)
        yield agents
        yield GaugeMetricFamily("storage_events_relay_channels", "dCache API channels",
                                value=len(self.channels.registry.channels))
        yield GaugeMetricFamily("storage_events_relay_channel_clients",
                                "Clients connected to dCache API channel streams",
                                value=len(self.channels.streams))
        up = GaugeMetricFamily("storage_events_relay_upstream_connected",
                               "1 while the feed of an upstream relay is being pulled",
                               labels=["upstream"])
        taken = GaugeMetricFamily("storage_events_relay_upstream_checkpoint",
                                  "The upstream's id of the last event taken from it",
                                  labels=["upstream"])
        for p in self.pullers:
            up.add_metric([p.name], int(p.connected))
            taken.add_metric([p.name], p.checkpoint)
        yield up
        yield taken
        push = GaugeMetricFamily("storage_events_relay_push_connected",
                                 "1 while pushing to another relay", labels=["target"])
        acked = GaugeMetricFamily("storage_events_relay_push_acked",
                                  "The last of our ids the other relay holds", labels=["target"])
        for q in self.pushers:
            push.add_metric([q.cfg.url], int(q.connected))
            acked.add_metric([q.cfg.url], q.position)
        yield push
        yield acked
        relays = GaugeMetricFamily("storage_events_relay_pushing_relays",
                                   "Connections of relays pushing to this one", labels=["relay"])
        for name, n in sorted(self.ingest.relays.items()):
            relays.add_metric([name], n)
        yield relays
        yield CounterMetricFamily("storage_events_relay_federation_loops",
                                  "Events dropped because they had already passed through this "
                                  "relay (a federation loop)", value=self.ingest.looped)
        yield CounterMetricFamily("storage_events_relay_channel_events",
                                  "Events added to dCache API channel backlogs since start",
                                  value=self.channels.routed)


def metrics_endpoint(log: EventLog, hub: Hub, ingest: Ingest, feed: Feed,
                     channels: ChannelService, pullers: list[Puller],
                     pushers: list[Pusher]) -> Callable[[Request], Awaitable[Response]]:
    registry = CollectorRegistry()
    registry.register(RelayCollector(log, hub, ingest, feed, channels, pullers, pushers))

    async def endpoint(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return endpoint
