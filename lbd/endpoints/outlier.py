"""Passive outlier ejection, as Envoy's: fed by the data path's connect results.

``consecutiveFailures`` connect failures in a row eject an endpoint for ``baseEjectionTime`` times
the number of times it was ejected, capped at ``maxEjectionTime``; the count starts over once
an endpoint has stayed in for ``maxEjectionTime``. At most ``maxEjectionPercent`` of a pool's
endpoints are out at once (at least one, as Envoy, when the percentage is above 0). The
detector holds the failure counts; the pool stays the owner of eligibility (``set_ejected``).

An active health check that passes while the endpoint is healthy ends its ejection at once,
as Envoy's ``successful_active_health_check_uneject_host`` (default on) does: the check has just
seen the endpoint work, so waiting out the ejection only keeps a good endpoint idle.

With several workers an ejection is global, as Envoy's is across its worker threads: the worker
that saw the failures announces it (``EndpointSlots.announce_ejection``, relayed by the
supervisor) and every other worker ejects the endpoint for the same time (``follow``). Each
worker counts failures only of its own connections, and the metrics count an ejection once,
in the worker that decided it. An early return (the probing worker's check passed) is
announced the same way, with 0 seconds.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from lbd.config.model import OutlierDetection
from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.pool import Pool

log = structlog.get_logger("lbd.outlier")


class OutlierDetector:
    __slots__ = (
        "_ejections",
        "_failures",
        "_returned",
        "_timers",
        "ejections_overflow_total",
        "ejections_total",
        "pool",
        "spec",
    )

    def __init__(self, pool: Pool, spec: OutlierDetection) -> None:
        self.pool = pool
        self.spec = spec
        self._failures: dict[UpstreamEndpoint, int] = {}  # in a row
        self._ejections: dict[UpstreamEndpoint, int] = {}  # for the ejection time multiplier
        self._returned: dict[UpstreamEndpoint, float] = {}  # monotonic time of last return
        self._timers: dict[UpstreamEndpoint, asyncio.TimerHandle] = {}  # the ejections' ends
        self.ejections_total = 0
        self.ejections_overflow_total = 0  # ejections skipped: maxEjectionPercent reached

    def connect_succeeded(self, endpoint: UpstreamEndpoint) -> None:
        if self._failures:
            self._failures.pop(endpoint, None)

    def connect_failed(self, endpoint: UpstreamEndpoint) -> None:
        count = self._failures.get(endpoint, 0) + 1
        self._failures[endpoint] = count
        if count >= self.spec.consecutive_failures and not endpoint.ejected:
            self._eject(endpoint)

    def ejection_time(self, ejections: int) -> float:
        spec = self.spec
        return min(spec.base_ejection_time * ejections, spec.max_ejection_time)

    def _eject(self, endpoint: UpstreamEndpoint) -> None:
        if not self._room_to_eject():
            self.ejections_overflow_total += 1
            return
        ejections = self._count_ejection(endpoint)
        seconds = self.ejection_time(ejections)
        self.ejections_total += 1
        endpoint.stats.endpoint_ejections_total += 1
        self._take_out(endpoint, seconds)
        log.warning(
            "endpoint ejected",
            route=self.pool.name,
            endpoint=str(endpoint),
            failures=self._failures.get(endpoint, 0),
            seconds=seconds,
            ejections=ejections,
        )
        self._announce(endpoint, seconds)

    def follow(self, endpoint: UpstreamEndpoint, seconds: float) -> None:
        """Another worker ejected ``endpoint`` for ``seconds`` (it counted it): out here too.
        0 seconds: its ejection ended early (an active check passed), so back here too."""
        if seconds <= 0:
            self._end_early(endpoint)
        elif not (endpoint.ejected or endpoint.draining) and self._room_to_eject():
            self._count_ejection(endpoint)
            self._take_out(endpoint, seconds)

    def check_passed(self, endpoint: UpstreamEndpoint) -> None:
        """An active health check passed while ``endpoint`` is ejected: it is back now."""
        if self._end_early(endpoint):
            self._announce(endpoint, 0.0)

    def _end_early(self, endpoint: UpstreamEndpoint) -> bool:
        timer = self._timers.get(endpoint)
        if timer is None:
            return False
        timer.cancel()
        self._return(endpoint)
        return True

    def _announce(self, endpoint: UpstreamEndpoint, seconds: float) -> None:
        slots = self.pool.slots
        if slots is not None and slots.announce_ejection is not None:
            slots.announce_ejection(self.pool.route_key, endpoint.address, endpoint.port, seconds)

    def _room_to_eject(self) -> bool:
        present = [m for m in self.pool.members if not m.draining and m.config_weight > 0]
        percent = self.spec.max_ejection_percent
        allowed = max(1, len(present) * percent // 100) if percent else 0
        return sum(1 for m in present if m.ejected) < allowed

    def _count_ejection(self, endpoint: UpstreamEndpoint) -> int:
        """This ejection's number for ``endpoint`` (the ejection time's multiplier)."""
        now = time.monotonic()
        previous = self._ejections.get(endpoint, 0)
        if now - self._returned.get(endpoint, now) >= self.spec.max_ejection_time:
            previous = 0  # it behaved for a long while: start over
        ejections = self._ejections[endpoint] = previous + 1
        return ejections

    def _take_out(self, endpoint: UpstreamEndpoint, seconds: float) -> None:
        self.pool.set_ejected(endpoint, True)
        loop = asyncio.get_running_loop()
        self._timers[endpoint] = loop.call_later(seconds, self._return, endpoint)

    def _return(self, endpoint: UpstreamEndpoint) -> None:
        self._timers.pop(endpoint, None)
        self._failures.pop(endpoint, None)
        # Also when it is draining: a reload may add it back while it still has connections,
        # and it must not come back ejected with no ejection left to end.
        self.pool.set_ejected(endpoint, False)
        if endpoint.draining:  # gone from the config meanwhile: forget it
            self._ejections.pop(endpoint, None)
            self._returned.pop(endpoint, None)
            return
        self._returned[endpoint] = time.monotonic()
        log.info("endpoint returned", route=self.pool.name, endpoint=str(endpoint))
