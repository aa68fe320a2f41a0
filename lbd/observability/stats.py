"""Plain-int counters the data path writes; ``metrics`` reads them at scrape time.

The data path never calls a Prometheus client object: an ``+= 1`` on a slot is the whole cost
of counting, and histograms are a ``bisect`` into a fixed list of bucket counts, once per
connection (never per chunk of bytes). Everything here is written by one event loop only.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

# Upper bounds in seconds (Prometheus ``le``), +Inf implied. Connect times on one host are
# sub-millisecond; across a network a few ms; timeouts show up in the top buckets.
CONNECT_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip
# Connections live from milliseconds (one request) to hours (databases, streams).
CX_LENGTH_SECONDS_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0
)  # fmt: skip


class Buckets:
    """A histogram as plain ints: ``counts[i]`` observations fell in bucket i (not cumulative;
    the last slot is +Inf). ``metrics`` makes them cumulative when it renders them."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0  # the sum of observed values

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass(slots=True)
class EndpointStats:
    """Counters of one endpoint of one service port (the upstream side)."""

    cx_total: int = 0
    connect_fail: int = 0
    connect_timeout: int = 0
    bytes_sent: int = 0  # lbd → endpoint, of closed connections (open ones add theirs at scrape)
    bytes_received: int = 0  # endpoint → lbd, likewise
    ejections: int = 0  # by outlier detection, in the worker that decided the ejection
    connect_seconds: Buckets = field(default_factory=lambda: Buckets(CONNECT_SECONDS_BUCKETS))


@dataclass(slots=True)
class ProcessStats:
    """Process-wide facts: reloads and when the current config was applied."""

    started: float = field(default_factory=time.time)
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_reload_ok_time: float = 0.0  # wall clock of the last successful apply (start counts)
    last_reload_failed_time: float = 0.0
    reloads_unchanged: int = 0  # the file was read again but its bytes had not changed
    listener_bind_failures: int = 0  # at start or in a reload's prepare phase
    dns_resolutions_ok: int = 0  # ExternalName answers applied
    dns_resolutions_failed: int = 0  # failed or empty: the last good answer stays
    health_check_requests: int = 0  # healthCheckNodePort requests answered

    def __post_init__(self) -> None:
        self.last_reload_ok_time = self.last_reload_ok_time or self.started

    def reload_succeeded(self) -> None:
        self.reloads_ok += 1
        self.last_reload_ok_time = time.time()

    def reload_failed(self) -> None:
        self.reloads_failed += 1
        self.last_reload_failed_time = time.time()
