"""The endpoints of one service port and their live state: the single owner of that state.

Health (later) says "live", config says "exists"; ``eligible()`` needs both. Active connection
counts are written only through ``acquire``/``release`` so that moving the counts somewhere
shared between workers is a change inside this class, not a rewrite of its callers.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable


class UpstreamEndpoint:
    """One (address, port) that connections of a service port can be sent to."""

    __slots__ = ("active", "address", "draining", "family", "port", "weight")

    def __init__(self, address: str, port: int, weight: int = 1) -> None:
        self.address = address
        self.port = port
        self.weight = weight
        self.active = 0
        self.draining = False  # removed from the config; kept while connections remain
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.family == socket.AF_INET6 else self.address
        return f"{host}:{self.port}"

    def __repr__(self) -> str:
        return f"UpstreamEndpoint({self}, weight={self.weight}, active={self.active})"


PoolWatcher = Callable[["Pool"], None]


class Pool:
    """Watchers (``watch``) are told, synchronously, whenever the members or the eligible
    endpoints change, so state tied to an endpoint (UDP sessions) can follow at once: a
    datagram that arrives after ``update()`` returns already sees the new endpoints."""

    __slots__ = ("_draining", "_eligible", "_watchers", "members")

    def __init__(self, members: Iterable[UpstreamEndpoint] = ()) -> None:
        self.members: list[UpstreamEndpoint] = list(members)
        # Removed endpoints that still carry connections: re-adding one revives the same
        # object, so its active count (least-connection) stays right.
        self._draining: dict[tuple[str, int], UpstreamEndpoint] = {}
        self._eligible: list[UpstreamEndpoint] = []
        self._watchers: list[PoolWatcher] = []
        self._refresh()

    def watch(self, watcher: PoolWatcher) -> Callable[[], None]:
        """Call ``watcher(pool)`` after every change of members or eligibility; returns the
        function that stops it. Watchers must not raise: they run inside ``update``."""
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch

    def refresh(self) -> None:
        """Recompute eligibility after an endpoint's state changed (e.g. health)."""
        self._refresh()

    def eligible(self) -> list[UpstreamEndpoint]:
        """Endpoints that may take a new connection. Do not mutate the returned list."""
        return self._eligible

    def draining(self) -> list[UpstreamEndpoint]:
        return [m for m in self._draining.values() if m.active > 0]

    def acquire(self, endpoint: UpstreamEndpoint) -> None:
        endpoint.active += 1

    def release(self, endpoint: UpstreamEndpoint) -> None:
        endpoint.active -= 1

    def update(self, wanted: Iterable[tuple[str, int, int]]) -> tuple[int, int]:
        """Make the members (address, port, weight); keep the objects of endpoints that stay so
        their counts and balancer positions survive. Returns (added, removed)."""
        current = {member.key: member for member in self.members}
        members: list[UpstreamEndpoint] = []
        added = 0
        for address, port, weight in wanted:
            key = (address, port)
            member = current.pop(key, None) or self._draining.pop(key, None)
            if member is None:
                member = UpstreamEndpoint(address, port, weight)
                added += 1
            member.weight = weight
            member.draining = False
            members.append(member)
        for gone in current.values():
            gone.draining = True
            self._draining[gone.key] = gone
        self._draining = {k: m for k, m in self._draining.items() if m.active > 0}
        changed = members != self.members
        self.members = members
        self._refresh(changed)
        return added, len(current)

    def drain_all(self) -> None:
        """The service port is gone: every endpoint drains."""
        self.update(())

    def _refresh(self, members_changed: bool = False) -> None:
        eligible = [m for m in self.members if m.weight > 0 and not m.draining]
        # Endpoints compare by identity: a list equal to the old one is the same endpoints.
        changed = members_changed or eligible != self._eligible
        self._eligible = eligible
        if changed:
            for watcher in list(self._watchers):
                watcher(self)
