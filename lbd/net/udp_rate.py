"""``udpSessionRate``: new UDP sessions per second from one client address.

Each address has a token bucket holding up to one second's worth of sessions (the rate is the
burst too); a session takes a token, and tokens come back at the rate. A datagram from an
address with no token starts no session: it is dropped and counted
(``udp_sess_dropped_total{reason="rate"}``). Datagrams of open sessions are never limited.

The table is bounded (``MAX_SOURCES``): past it, the address seen least recently is forgotten,
which gives it a full bucket again should it come back. One table per listener socket, owned
by its worker's loop, so with ``workers: N`` an address may start up to N times the rate.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_SOURCES = 65_536  # client addresses remembered per listener


class SourceRate:
    """Token buckets of new sessions, one per client address."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def allow(self, source: str, rate: int, now: float) -> bool:
        """Whether ``source`` may start a session now (then it has one token less)."""
        buckets = self.buckets
        bucket = buckets.get(source)
        if bucket is None:
            tokens = float(rate)
            if len(buckets) >= MAX_SOURCES:
                buckets.popitem(last=False)
        else:
            tokens, since = bucket
            tokens = min(float(rate), tokens + (now - since) * rate)
            buckets.move_to_end(source)
        allowed = tokens >= 1.0
        buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        return allowed
