"""Prometheus metrics of a running agent, read from its parts at scrape time (no cost per
event)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .outbox import Outbox
    from .spool import Spool
    from .uplink import Uplink
    from .watcher import Watcher


class Agent(Protocol):
    """What the metrics read of a running agent (:class:`~.runner.Agent`), at scrape time."""

    outbox: Outbox
    uplinks: list[Uplink]
    watcher: Watcher
    spool: Spool | None
    refused: int
    paused: bool


class AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        boxes = [up.outbox for up in a.uplinks]
        yield CounterMetricFamily(
            "storage_events_agent_events_published",
            "Events numbered into the outbox by this run",
            value=a.outbox.last_seq,
        )
        yield CounterMetricFamily(
            "storage_events_agent_events_acked",
            "Events of this run the relay acknowledged",
            value=a.outbox.acked,
        )
        yield GaugeMetricFamily(
            "storage_events_agent_events_unacked",
            "Events not yet acknowledged, earlier runs included",
            value=sum(b.unacked for b in boxes),
        )
        yield CounterMetricFamily(
            "storage_events_agent_overflows",
            "Kernel queue overflows (each announced and rescanned)",
            value=a.watcher.tree.rescans,
        )
        yield CounterMetricFamily(
            "storage_events_agent_events_refused",
            "Events no relay would accept (e.g. a path over the limit), "
            "published as overflow notices of an ancestor instead",
            value=a.refused,
        )
        yield GaugeMetricFamily(
            "storage_events_agent_watches", "inotify watches held", value=a.watcher.tree.watch_count
        )
        yield GaugeMetricFamily(
            "storage_events_agent_unwatched_directories",
            "Directories in the trees without a watch now (permission, "
            "watch limit, a second view of a bind mount): retried",
            value=a.watcher.tree.unwatched_count,
        )
        yield CounterMetricFamily(
            "storage_events_agent_watch_errors",
            "Directories that could not be watched",
            value=a.watcher.watch_errors,
        )
        yield GaugeMetricFamily(
            "storage_events_agent_relay_connected",
            "1 while connected to the relay",
            value=float(a.uplinks[0].connected.is_set()),
        )
        if a.spool is not None:
            yield GaugeMetricFamily(
                "storage_events_agent_spool_bytes",
                "Bytes of unacknowledged events in the spool",
                value=a.spool.size,
            )
            yield GaugeMetricFamily(
                "storage_events_agent_spool_quota_bytes", "The spool quota", value=a.spool.quota
            )
            yield GaugeMetricFamily(
                "storage_events_agent_spool_disk_full",
                "1 while the spool cannot be written (its disk is full)",
                value=float(a.spool.disk_full),
            )
            yield GaugeMetricFamily(
                "storage_events_agent_journal_events",
                "Events published since the last tree snapshot",
                value=a.spool.journal_events,
            )
        yield GaugeMetricFamily(
            "storage_events_agent_paused",
            "1 while processing inotify events is paused because the spool (or memory) is full",
            value=float(a.paused),
        )


def serve_metrics(agent: Agent, listen: str) -> None:
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
