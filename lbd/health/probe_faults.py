"""Faults that act on lbd's own active health probes, when a fault asks to (``healthChecks:
true``; docs/faults.md). By default no fault touches a probe: probes connect to endpoints
directly, never through the proxy.

A fault that asks makes the probes of the endpoints in its scope, and only of its own service
port, misbehave: ``refuse`` and ``reset_peer`` make a probe fail, ``timeout`` makes it time
out, ``latency`` delays it (past the check's timeout, it fails as a timeout). Checkers are
shared by every service port that probes an endpoint the same way (``lbd.health.registry``),
so such a port gets checkers of its own: its check is a ``FaultedCheck``, a different key,
while other ports keep probing the endpoint as before; nothing leaks into them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from dataclasses import dataclass

from lbd.config.faultspec import Fault
from lbd.config.model import HealthCheck
from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.faults import RouteFaults
from lbd.health.probes import probe


@dataclass(frozen=True, slots=True)
class FaultedCheck(HealthCheck):
    """A service port's check of one endpoint with the faults it asked to act on probes."""

    faults: tuple[Fault, ...] = ()


def check_for(
    check: HealthCheck, faults: RouteFaults | None, endpoint: UpstreamEndpoint
) -> HealthCheck:
    """The check ``endpoint`` is probed with: ``check``, or with the probe faults in scope."""
    if faults is None:
        return check
    acting = tuple(
        fault.spec for fault in faults.tcp if fault.spec.health_checks and fault.covers(endpoint)
    )
    if not acting:
        return check
    fields = {field.name: getattr(check, field.name) for field in dataclasses.fields(check)}
    return FaultedCheck(**{**fields, "faults": acting})


async def faulty_probe(
    address: str, port: int, check: HealthCheck, rng: random.Random
) -> str | None:
    """``probe``, after the check's faults (if any) had their say."""
    if not isinstance(check, FaultedCheck):
        return await probe(address, port, check)
    delay = 0.0
    for fault in check.faults:
        if fault.probability < 1.0 and rng.random() >= fault.probability:
            continue
        if fault.type == "refuse":
            return "refused (fault)"
        if fault.type == "reset_peer":
            return "reset (fault)"
        if fault.type == "timeout":
            delay = check.timeout
            break
        jitter = rng.uniform(-fault.jitter, fault.jitter) if fault.jitter else 0.0
        delay += max(0.0, fault.latency + jitter)
    if delay >= check.timeout:
        await asyncio.sleep(check.timeout)
        return "timeout (fault)"
    if delay:
        await asyncio.sleep(delay)
        check = dataclasses.replace(check, timeout=check.timeout - delay)
    return await probe(address, port, check)
