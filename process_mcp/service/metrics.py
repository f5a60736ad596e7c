"""Prometheus metrics of one server, served at ``/metrics`` over HTTP.

Counters and the spawn histogram are updated where the events happen (cheap increments); live
processes per principal and the audit queue are read when scraped, through the callables its owner (the
spaces) hands it, so this module knows nothing of what it counts. Each server has a registry of its own,
so several servers in one process (an application, the tests) do not mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SPAWN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Bounds of the spawn launch histogram: a bare spawn takes milliseconds, a first Docker spawn seconds."""


LiveCounts = Callable[[], Iterable[tuple[str, int]]]
"""(principal, processes running now) for each principal; '' is the local caller."""


class Queue(Protocol):
    """What is read of the audit log: records waiting, records lost."""

    @property
    def depth(self) -> int: ...

    @property
    def lost(self) -> int: ...


class Metrics:
    """What the server counts; ``registry`` is what ``/metrics`` serves. ``live`` and ``audit`` are read
    at each scrape."""

    def __init__(self, live: LiveCounts, audit: Queue | None = None) -> None:
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
        self.registry.register(_ScrapeCollector(live, audit))


class _ScrapeCollector(Collector):
    def __init__(self, live: LiveCounts, audit: Queue | None) -> None:
        self._live = live
        self._audit = audit

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily(
            "process_mcp_live_processes", "Processes running now, by principal ('' is the local caller).",
            labels=["principal"],
        )  # fmt: skip
        for principal, count in self._live():
            live.add_metric([principal], count)
        yield live
        audit = self._audit
        if audit is not None:
            yield GaugeMetricFamily(
                "process_mcp_audit_queue_depth", "Audit records waiting to be written.", value=audit.depth
            )
            yield GaugeMetricFamily(
                "process_mcp_audit_records_lost", "Audit records that could not be written.", value=audit.lost
            )
