"""Session affinity (``sessionAffinity: ClientIP``): a table owned by a route, consulted before
the balancer, so balancers stay pure.

As kube-proxy does it, per service port: a client IP that comes back within ``timeoutSeconds``
of its last new connection (or UDP session) goes to the same endpoint; every use refreshes the
entry. Unlike kube-proxy's iptables mode, the entry is dropped at once when its endpoint leaves
the eligible set (``forget``), so a client is never pinned to an endpoint that is gone, and the
table is one per route rather than one per node's iptables ``recent`` list.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.pool import Pool
from lbd.shm.affinity_rows import AffinityRows, client_key, route_hash

# A table holds one entry per distinct client within the timeout. Past this size new clients
# are balanced without an entry (counted), so a flood of source addresses cannot exhaust memory.
MAX_ENTRIES = 1_000_000
SWEEP_MIN = 1024


class AffinityTable:
    __slots__ = ("_entries", "_next_sweep", "overflow", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._entries: dict[str, tuple[UpstreamEndpoint, float]] = {}
        self._next_sweep = SWEEP_MIN
        self.overflow = 0  # clients not recorded because the table was full

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self,
        client: str,
        now: float,
        eligible: Collection[UpstreamEndpoint] | None = None,  # used by SharedAffinityTable
    ) -> UpstreamEndpoint | None:
        entry = self._entries.get(client)
        if entry is None:
            return None
        endpoint, last = entry
        if now - last > self.timeout:
            del self._entries[client]
            return None
        return endpoint

    def record(self, client: str, endpoint: UpstreamEndpoint, now: float) -> None:
        entries = self._entries
        if client not in entries and len(entries) >= self._next_sweep:
            self._sweep(now)
            if len(entries) >= MAX_ENTRIES:
                self.overflow += 1
                return
        entries[client] = (endpoint, now)

    def forget(self, keep: Collection[UpstreamEndpoint]) -> list[str]:
        """Drop the entries whose endpoint is not in ``keep`` (it left the eligible set);
        returns their clients."""
        gone = [client for client, (endpoint, _) in self._entries.items() if endpoint not in keep]
        for client in gone:
            del self._entries[client]
        return gone

    def _sweep(self, now: float) -> None:
        """Drop expired entries; amortised: runs when the table has doubled since the last."""
        expired = [c for c, (_, last) in self._entries.items() if now - last > self.timeout]
        for client in expired:
            del self._entries[client]
        self._next_sweep = min(MAX_ENTRIES, max(SWEEP_MIN, 2 * len(self._entries)))


class SharedAffinityTable(AffinityTable):
    """A route's affinity with several workers: the local table plus the shared rows."""

    __slots__ = ("_pool", "_route", "_rows")

    def __init__(self, timeout: float, rows: AffinityRows, pool: Pool) -> None:
        super().__init__(timeout)
        self._rows = rows
        self._route = route_hash(pool.route_key)
        self._pool = pool  # maps a slot back to this worker's endpoint object

    def lookup(
        self,
        client: str,
        now: float,
        eligible: Collection[UpstreamEndpoint] | None = None,
    ) -> UpstreamEndpoint | None:
        key = client_key(client)
        if not key:
            return super().lookup(client, now, eligible)
        found = sorted(self._rows.find(self._route, key, time.monotonic(), self.timeout))
        for _first, slot in found:
            for endpoint in self._pool.members:
                if endpoint.slot == slot and (eligible is None or endpoint in eligible):
                    return endpoint
        return None

    def record(self, client: str, endpoint: UpstreamEndpoint, now: float) -> None:
        super().record(client, endpoint, now)
        key = client_key(client)
        if (
            key
            and endpoint.slot >= 0
            and not self._rows.write(
                self._route, key, endpoint.slot, time.monotonic(), self.timeout
            )
        ):
            self.overflow += 1

    def forget(self, keep: Collection[UpstreamEndpoint]) -> list[str]:
        gone = super().forget(keep)
        for client in gone:
            key = client_key(client)
            if key:
                self._rows.clear(self._route, key)
        return gone
