"""The faults and the mirror of one service port while they are in force (docs/faults.md).

A ``RouteFaults`` holds the port's ``LiveFault``s: those of its config (re-applied on every
reload; one that did not change keeps its object and counters) and those added over the admin
API (kept across reloads while the port exists). The data path asks it once per connection or
UDP session whether anything applies (``Route.faults`` is None when nothing is configured, so a
port without faults pays one ``is None`` per connection); what each fault does to bytes and
datagrams is ``lbd.net.tcp_faults`` and ``lbd.net.udp_faults``. A fault that is removed is
marked not ``live``: connections that took it stop applying it from their next byte.
"""

from __future__ import annotations

import random

from lbd.config.faultspec import Fault, Mirror
from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.observability.stats import FaultStats

CONFIG = "config"
RUNTIME = "runtime"


class LiveFault:
    """One fault of one service port: its spec, its id, where it came from, its counters."""

    __slots__ = ("id", "live", "origin", "spec", "stats")

    def __init__(self, fault_id: str, spec: Fault, origin: str) -> None:
        self.id = fault_id
        self.spec = spec
        self.origin = origin  # CONFIG (the file) or RUNTIME (the admin API)
        self.stats = FaultStats()
        self.live = True  # False once removed: connections that took it stop applying it

    def covers(self, endpoint: UpstreamEndpoint) -> bool:
        """Whether traffic to ``endpoint`` is in this fault's scope."""
        scope = self.spec.endpoints
        if not scope:
            return True
        address, port = endpoint.address, endpoint.port
        return any(a == address and (p is None or p == port) for a, p in scope)


class RouteFaults:
    """Every fault of one service port (config first, then runtime ones, each in order) and
    its mirror; the randomness each probability is rolled with is injected."""

    __slots__ = ("configured", "mirror", "rng", "runtime", "tcp", "udp")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.configured: list[LiveFault] = []
        self.runtime: list[LiveFault] = []
        self.mirror: Mirror | None = None
        self.tcp: tuple[LiveFault, ...] = ()  # every live TCP fault, in order
        self.udp: tuple[LiveFault, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.configured and not self.runtime and self.mirror is None

    @property
    def faults(self) -> tuple[LiveFault, ...]:
        return (*self.configured, *self.runtime)

    def roll(self, probability: float) -> bool:
        """True with ``probability`` (1.0 always, 0.0 never)."""
        return probability >= 1.0 or (probability > 0.0 and self.rng.random() < probability)

    def configure(self, prefix: str, faults: tuple[Fault, ...], mirror: Mirror | None) -> None:
        """The config's faults (a reload): one at the same place with the same spec is kept
        with its counters; one that went away stops acting. Their ids are ``prefix`` and
        their place (``default.web.http.0``: names of Kubernetes objects hold no dots)."""
        kept: list[LiveFault] = []
        for index, spec in enumerate(faults):
            old = self.configured[index] if index < len(self.configured) else None
            if old is not None and old.spec == spec:
                kept.append(old)
            else:
                kept.append(LiveFault(f"{prefix}.{index}", spec, CONFIG))
        for old in self.configured:
            if old not in kept:
                old.live = False
        self.configured = kept
        self.mirror = mirror
        self._index()

    def add(self, fault_id: str, spec: Fault) -> LiveFault:
        fault = LiveFault(fault_id, spec, RUNTIME)
        self.runtime.append(fault)
        self._index()
        return fault

    def remove(self, fault_id: str) -> LiveFault | None:
        """Remove a runtime fault (config faults change by reloading the file)."""
        for fault in self.runtime:
            if fault.id == fault_id:
                self.runtime.remove(fault)
                fault.live = False
                self._index()
                return fault
        return None

    def _index(self) -> None:
        every = self.faults
        self.tcp = tuple(fault for fault in every if fault.spec.tcp)
        self.udp = tuple(fault for fault in every if not fault.spec.tcp)
