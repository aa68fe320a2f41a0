"""ExternalName services: resolve the name, balance over the answers, follow the TTL.

One resolver per ExternalName service (a control-plane task, not the data path). Each good
answer (at least one A or AAAA record) replaces the pool of every port of the service with the
answered addresses on the port's targetPort; the next query is due after the records' TTL,
clamped to ``dns.minTtl``..``dns.maxTtl``. A failed query (timeout, SERVFAIL, NXDOMAIN, no
records) keeps the last good answer and is retried after ``minTtl``: a resolver outage does not
take the service down.

dnspython queries ``dns.servers`` (``IP:PORT``) when the config names some, and the system's
resolvers (/etc/resolv.conf) otherwise; search domains are never applied (the name is taken as
absolute, as a CNAME target is).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import structlog

from lbd.config.model import Dns
from lbd.endpoints.route import Route
from lbd.observability.stats import ProcessStats

log = structlog.get_logger("lbd.runtime.dns")

# (route, targetPort) of every port of the service, as the runtime has them now.
RoutesOf = Callable[[], list[tuple[Route, int]]]


def make_resolver(config: Dns) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=not config.servers)
    if config.servers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in config.servers
        ]
    resolver.lifetime = config.timeout
    resolver.timeout = config.timeout
    return resolver


async def resolve(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[tuple[str, ...], float]:
    """(sorted addresses, smallest TTL) of ``name``'s A and AAAA records; raises
    ``dns.exception.DNSException`` when neither query gives a record."""
    addresses: set[str] = set()
    ttls: list[float] = []
    errors: list[dns.exception.DNSException] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN) as error:
            errors.append(error)
            continue
        if answer.rrset is not None:
            ttls.append(answer.rrset.ttl)
            addresses.update(str(ipaddress.ip_address(r.to_text())) for r in answer.rrset)
    if not addresses:
        raise errors[0] if errors else dns.resolver.NoAnswer
    return tuple(sorted(addresses)), min(ttls)


class ExternalNameResolver:
    """Keeps one ExternalName service's pools filled with the addresses its name resolves to."""

    def __init__(
        self,
        service: str,
        name: str,
        config: Dns,
        routes: RoutesOf,
        process: ProcessStats,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.service = service
        self.changed = changed  # e.g. start or stop health checkers for the new answer
        self.name = name
        self.config = config
        self.routes = routes
        self.process = process
        self.addresses: tuple[str, ...] = ()  # the last good answer
        self.resolver = make_resolver(config)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def apply(self) -> None:
        """Give every port of the service the last good answer (also after a reload)."""
        for route, target_port in self.routes():
            route.pool.update((address, target_port, 1) for address in self.addresses)

    async def _run(self) -> None:
        while True:
            try:
                addresses, ttl = await resolve(self.resolver, self.name)
            except (dns.exception.DNSException, OSError) as error:
                self.process.dns_resolutions_total.failure += 1
                log.warning(
                    "externalName resolution failed, keeping the last answer",
                    service=self.service,
                    name=self.name,
                    error=str(error) or type(error).__name__,
                    addresses=list(self.addresses),
                )
                await asyncio.sleep(self.config.min_ttl)
                continue
            self.process.dns_resolutions_total.success += 1
            if addresses != self.addresses:
                log.info(
                    "externalName resolved",
                    service=self.service,
                    name=self.name,
                    addresses=list(addresses),
                    ttl=ttl,
                )
                self.addresses = addresses
                self.apply()
                self.changed()
            await asyncio.sleep(min(max(ttl, self.config.min_ttl), self.config.max_ttl))
