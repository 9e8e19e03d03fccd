"""Counters for /metrics, kept as plain integers on the hot path.

prometheus_client's own Counter takes a lock per increment; at a few
microseconds per push that is a large share.  pushsvc counts in plain
attributes and a custom collector turns them into Prometheus families only
when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from pushsvc.hub import Hub

# Seconds; a push is handled in microseconds unless something is wrong.
PUSH_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1)


class Metrics:
    """What happened since start-up; every field is a monotonically growing count."""

    def __init__(self) -> None:
        self.pushes = {"delivered": 0, "offline": 0, "error": 0}
        self.broadcasts = 0
        self.auth_failures: Counter[str] = Counter()
        self.backend_connections = 0
        self.disconnects: Counter[str] = Counter()
        self.handshake_refusals: Counter[str] = Counter()  # by HTTP status (403, 429, 503...)
        # Whatever a peer sent that was refused, by kind (docs/security.md lists the kinds).
        self.rejected: Counter[str] = Counter()
        self._push_counts = [0] * (len(PUSH_BUCKETS) + 1)
        self._push_sum = 0.0

    def observe_push(self, seconds: float) -> None:
        """Record how long one push request took to handle."""
        self._push_counts[bisect_left(PUSH_BUCKETS, seconds)] += 1
        self._push_sum += seconds

    def push_histogram(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) buckets and the sum, as Prometheus wants them."""
        buckets = []
        total = 0
        for bound, count in zip((*PUSH_BUCKETS, float("inf")), self._push_counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return buckets, self._push_sum


class MetricsCollector:
    """A prometheus_client collector reading the hub and the Metrics at scrape time."""

    def __init__(self, hub: Hub, metrics: Metrics, stale: Callable[[], int]) -> None:
        self.hub = hub
        self.metrics = metrics
        self.stale = stale

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges()
        yield from self._counters()
        buckets, total = self.metrics.push_histogram()
        yield HistogramMetricFamily(
            "pushsvc_push_handling_seconds",
            "Time to handle one push or broadcast request, excluding network I/O.",
            buckets=buckets,
            sum_value=total,
        )

    def _gauges(self) -> Iterator[Metric]:
        counts = self.hub.counts()
        yield _gauge(
            "pushsvc_connections", "Authenticated WebSocket connections.", counts["connections"]
        )
        yield _gauge(
            "pushsvc_pending_connections",
            "WebSocket connections that have not authenticated yet.",
            counts["pending"],
        )
        yield _gauge("pushsvc_online_uids", "Distinct uids with a live connection.", counts["uids"])
        yield _gauge("pushsvc_groups", "Groups with at least one member.", counts["groups"])
        yield _gauge(
            "pushsvc_backend_connections",
            "Open backend connections.",
            self.metrics.backend_connections,
        )

    def _counters(self) -> Iterator[Metric]:
        m = self.metrics
        pushes = CounterMetricFamily(
            "pushsvc_pushes", "Push requests by outcome.", labels=["outcome"]
        )
        for outcome, count in m.pushes.items():
            pushes.add_metric([outcome], count)
        yield pushes
        yield CounterMetricFamily("pushsvc_broadcasts", "Broadcast requests.", value=m.broadcasts)
        yield CounterMetricFamily(
            "pushsvc_frames_sent",
            "Frames written to WebSocket connections.",
            value=self.hub.frames_sent,
        )
        yield CounterMetricFamily(
            "pushsvc_bytes_sent",
            "Payload bytes written to WebSocket connections.",
            value=self.hub.bytes_sent,
        )
        yield _labeled(
            "pushsvc_auth_failures",
            "Refused WebSocket authentications by close code.",
            "code",
            m.auth_failures,
        )
        yield _labeled(
            "pushsvc_forced_disconnects",
            "Connections closed by pushsvc, by reason.",
            "reason",
            m.disconnects,
        )
        yield _labeled(
            "pushsvc_rejected",
            "Input refused from peers, by reason (bad tokens, oversized handshakes...).",
            "reason",
            m.rejected,
        )
        yield _labeled(
            "pushsvc_handshake_refusals",
            "WebSocket opening handshakes refused, by HTTP status.",
            "status",
            m.handshake_refusals,
        )
        yield CounterMetricFamily(
            "pushsvc_cluster_stale_messages",
            "Messages from other nodes dropped as older than 30 s (overload).",
            value=self.stale(),
        )


def _labeled(name: str, doc: str, label: str, counts: Mapping[Any, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([str(key)], count)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
