"""Prometheus metrics of one server, served at ``/metrics`` over HTTP.

Every figure is fed by the events that change it, where they happen (cheap increments): calls as they
return, launches and ends of processes, and the processes running now, up at each start and down at
each exit. Only the audit queue, which is not the server's to count, is read when scraped. This module
knows nothing of what it counts. Each server has a registry of its own, so several servers in one
process (an application, the tests) do not mix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SPAWN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Bounds of the spawn launch histogram: a bare spawn takes milliseconds, a first Docker spawn seconds."""


class Queue(Protocol):
    """What is read of the audit log: records waiting, records lost."""

    @property
    def depth(self) -> int: ...

    @property
    def lost(self) -> int: ...


class Metrics:
    """What the server counts; ``registry`` is what ``/metrics`` serves. ``audit`` is read at each scrape."""

    def __init__(self, audit: Queue | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter(
            "process_mcp_tool_calls", "Tool calls by tool and outcome (ok or the error code).",
            ["tool", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.spawn_seconds = Histogram(
            "process_mcp_spawn_launch_seconds", "Time to start a process, from the spawn call to its running.",
            buckets=SPAWN_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.output_bytes = Counter(
            "process_mcp_output_bytes",
            "Output bytes processes produced, counted when each ends.",
            registry=self.registry,
        )
        self.live = Gauge(
            "process_mcp_live_processes", "Processes running now, by principal ('' is the local caller).",
            ["principal"], registry=self.registry,
        )  # fmt: skip
        if audit is not None:
            self.registry.register(_AuditCollector(audit))


class _AuditCollector(Collector):
    def __init__(self, audit: Queue) -> None:
        self._audit = audit

    def collect(self) -> Iterator[Metric]:
        audit = self._audit
        yield GaugeMetricFamily(
            "process_mcp_audit_queue_depth", "Audit records waiting to be written.", value=audit.depth
        )
        yield GaugeMetricFamily(
            "process_mcp_audit_records_lost", "Audit records that could not be written.", value=audit.lost
        )
