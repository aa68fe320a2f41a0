"""Service addresses on the node (``node.manageAddresses``): lbd puts every ClusterIP, external
IP and LoadBalancer IP it serves on the node, and takes each off when no service uses it.

A listener can bind an address the node does not have (IP_FREEBIND), but the kernel delivers a
packet only to an address that is local: a ClusterIP routed to the node, or a LoadBalancer IP a
router sends it, is dropped unless the address is on some interface. kube-proxy's IPVS mode puts
them on its dummy interface ``kube-ipvs0``; lbd does the same (``lbd.net.netlink`` says where,
and how it marks what is its own).

The rules:
- an address goes on before the listener that needs it (``prepare``, the reload's first phase);
- an address comes off when no service of the running config uses it and no open connection
  still drains through it (checked after each reload's commit, then every ``syncPeriod``);
- on exit everything of lbd's comes off, unless a successor took over (seamless restart: the
  successor adopts them by their mark);
- an address lbd did not add is never touched: one that was on the node before is never added
  (it is there) nor removed (it has no mark);
- loopback addresses (127.0.0.0/8, ::1) are local already and are left alone;
- every ``syncPeriod`` and on every netlink address event, what someone else removed is put back
  (logged, counted as ``restored``).
- lbd never sets ``route_localnet``: 127.0.0.1:nodePort stays unreachable from other hosts.

Only the process that owns the node's listeners manages addresses (one lbd per node).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterable

import structlog
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

from lbd.config.model import DEFAULT_SYNC_PERIOD, Config, listeners_of
from lbd.net.loops import rearm_reader
from lbd.net.netlink import NetlinkFailure, NodeNetlink, Outcome
from lbd.observability.stats import NodeAddressStats

log = structlog.get_logger("lbd.net.addresses")

EVENT_GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_LINK
EVENT_BUFFER = 1 << 16


def service_addresses(config: Config) -> frozenset[str]:
    """The addresses lbd must have on the node for ``config``: ClusterIPs, external IPs and
    LoadBalancer IPs (not NodePorts: those bind the node's own addresses)."""
    return frozenset(
        spec.address
        for service in config.services
        for spec in listeners_of(service, config.node)
        if spec.kind != "nodePort" and not ipaddress.ip_address(spec.address).is_loopback
    )


class NodeAddresses:
    """Owned by the runtime, called in its phases: ``prepare`` (awaited before binding),
    ``commit`` (after start and every reload; starts watching), ``stop_watching`` (when
    shutdown begins) and ``release`` (on exit).

    ``draining()`` names the local addresses open connections use: an address of lbd's among
    them stays until those connections end. Everything is a no-op while the config says
    ``manageAddresses: false``.
    """

    def __init__(
        self,
        draining: Callable[[], Iterable[str]] = tuple,
        netlink: NodeNetlink | None = None,
    ) -> None:
        self.stats = NodeAddressStats()
        self.draining = draining
        self.netlink = netlink or NodeNetlink()
        self.enabled = False
        self.sync_period = DEFAULT_SYNC_PERIOD
        self.wanted: frozenset[str] = frozenset()  # the running config's
        self.owned: set[str] = set()  # what this process put on the node (or adopted)
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._events: socket.socket | None = None
        self._stopped = False  # shutting down: no watching again

    async def prepare(self, new: Config) -> None:
        """Before ``new``'s listeners bind: add its addresses (the running ones stay too).
        Raises NetlinkFailure when the node's addresses cannot be read at all."""
        if not new.node.manage_addresses:
            return
        await self._sync(self.wanted | service_addresses(new) | self._draining(), fail=True)

    def commit(self, new: Config) -> None:
        """``new`` runs now: what only the old config used comes off at the next sync (now)."""
        was = self.enabled
        self.enabled = new.node.manage_addresses
        self.sync_period = new.node.sync_period
        self.wanted = service_addresses(new) if self.enabled else frozenset()
        if self.enabled or was:
            self._kick.set()
        if self.enabled:
            self._start_watching()

    def _start_watching(self) -> None:
        """Reconcile every ``syncPeriod`` and on netlink address events, until stopped."""
        if self._task is not None or self._stopped:
            return
        loop = asyncio.get_running_loop()
        try:
            events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            events.setblocking(False)
            events.bind((0, EVENT_GROUPS))
        except OSError as error:
            log.warning("no netlink events; checking every syncPeriod", error=str(error))
        else:
            self._events = events
            loop.add_reader(events.fileno(), self._on_event)
        self._task = asyncio.create_task(self._run())

    def stop_watching(self) -> None:
        """Shutdown: no more reconciling (a successor, or ``release``, decides from here)."""
        self._stopped = True
        if self._events is not None:
            asyncio.get_running_loop().remove_reader(self._events.fileno())
            self._events.close()
            self._events = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def release(self, keep: bool = False) -> None:
        """On exit: take off every address of lbd's, unless ``keep`` (a successor serves)."""
        self.stop_watching()
        if keep or not (self.enabled or self.owned):
            return
        self.wanted = frozenset()
        self.enabled = False
        await self._sync(frozenset(), fail=False)

    def _on_event(self) -> None:
        events = self._events
        if events is None:
            return
        try:
            while events.recv(EVENT_BUFFER):
                pass
        except BlockingIOError:
            pass
        except OSError:  # ENOBUFS: events were lost; a sync reads the whole state anyway
            rearm_reader(asyncio.get_running_loop(), events.fileno(), self._on_event)
        self._kick.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.sync_period)
            self._kick.clear()
            if self.enabled or self.owned:
                await self._sync(self.wanted | self._draining(), fail=False)

    def _draining(self) -> frozenset[str]:
        """lbd's addresses that open connections still use: kept, never added for them."""
        return frozenset(self.owned.intersection(self.draining()))

    async def _sync(self, wanted: frozenset[str], fail: bool) -> None:
        async with self._lock:
            try:
                outcome = await asyncio.to_thread(self.netlink.reconcile, wanted)
            except NetlinkFailure as error:
                self.stats.node_address_errors_total += 1
                log.error("node addresses not reconciled", error=str(error))
                if fail:
                    raise
                return
            self._record(outcome)

    def _record(self, outcome: Outcome) -> None:
        for address in outcome.added:
            if address in self.owned:
                self.stats.node_address_changes_total.restored += 1
                log.warning(
                    "service address restored",
                    address=address,
                    device=outcome.device,
                    why="it was removed from the node by something other than lbd",
                )
            else:
                self.stats.node_address_changes_total.added += 1
                log.info("service address added", address=address, device=outcome.device)
            self.owned.add(address)
        self.owned.update(outcome.kept)  # left by a predecessor: adopted
        for address in outcome.removed:
            self.stats.node_address_changes_total.removed += 1
            self.owned.discard(address)
            log.info("service address removed", address=address, device=outcome.device)
        for address, why in outcome.failed:
            self.stats.node_address_errors_total += 1
            log.error("service address not changed", address=address, error=why)
