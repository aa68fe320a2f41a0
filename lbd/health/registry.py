"""Active health checks: one checker per (address, port, check) per lbd process.

The registry is the single owner of health state. Every pool that contains an endpoint
subscribes to that endpoint's checker; service ports sharing an endpoint (and the same check)
share one checker, so an endpoint sees one probe per interval however many ports use it.
A checker lives while it has subscribers (a reference count): ``sync`` after every pool change
(start, reload) starts checkers for new endpoints and stops those nobody uses any more.

Only transitions change state (HAProxy's rise/fall): ``healthyThreshold`` successes in a row
bring a down endpoint up, ``unhealthyThreshold`` failures in a row take an up endpoint down.
Endpoints start up (the config says they are ready) and the first probe runs at once.

With several workers, one of them probes (``probing=True``) and reports each transition
(``on_transition``); the supervisor passes it to the others, whose checkers only follow
(``follow``), so an endpoint is probed once per interval however many workers there are.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import structlog

from lbd.config.model import HealthCheck
from lbd.endpoints.faults import RouteFaults
from lbd.endpoints.pool import Pool
from lbd.health.probe_faults import check_for, faulty_probe
from lbd.health.probes import LocalError
from lbd.observability.stats import HealthStats

log = structlog.get_logger("lbd.health")

CheckKey = tuple[str, int, HealthCheck]
Transition = Callable[[CheckKey, bool], None]


class Checker:
    """Probes one endpoint and tells every subscribed pool about transitions."""

    def __init__(
        self,
        key: CheckKey,
        stats: HealthStats,
        rng: random.Random,
        on_transition: Transition | None = None,
    ) -> None:
        self.key = key
        self.on_transition = on_transition
        self.address, self.port, self.check = key
        self.stats = stats
        self.rng = rng
        self.subscribers: set[Pool] = set()
        self.healthy = True
        self.successes = 0  # in a row
        self.failures = 0  # in a row
        self.task: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"health {self}")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def __str__(self) -> str:
        return f"{self.check.type} {self.label}"

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        check = self.check
        while True:
            started = loop.time()
            try:
                reason = await faulty_probe(self.address, self.port, check, self.rng)
            except LocalError as error:
                self.stats.health_checks_skipped_total += 1
                log.warning("health check skipped", endpoint=self.label, error=str(error))
            else:
                self.record(reason)
            jitter = self.rng.uniform(-check.jitter, check.jitter) if check.jitter else 0.0
            await asyncio.sleep(max(0.0, started + check.interval + jitter - loop.time()))

    def record(self, reason: str | None) -> None:
        """One probe's result; changes state only on a threshold crossing."""
        stats = self.stats
        stats.health_checks_total += 1
        if reason is None:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= self.check.healthy_threshold:
                self._transition(True, None)
            if self.healthy:  # an ejected endpoint that passes is back (Envoy's default)
                for pool in self.subscribers:
                    pool.check_passed((self.address, self.port))
        else:
            stats.health_check_failures_total += 1
            self.failures += 1
            self.successes = 0
            if self.healthy and self.failures >= self.check.unhealthy_threshold:
                self._transition(False, reason)

    def _transition(self, healthy: bool, reason: str | None) -> None:
        self.healthy = healthy
        if healthy:
            self.stats.health_transitions_total.healthy += 1
            log.info("endpoint healthy", endpoint=self.label, check=self.check.type)
        else:
            self.stats.health_transitions_total.unhealthy += 1
            log.warning(
                "endpoint unhealthy",
                endpoint=self.label,
                check=self.check.type,
                reason=reason,
                failures=self.failures,
            )
        self._tell_pools()
        if self.on_transition is not None:
            self.on_transition(self.key, healthy)

    def follow(self, healthy: bool) -> None:
        """The probing worker's verdict (counted and logged there, not again here)."""
        if healthy != self.healthy:
            self.healthy = healthy
            self._tell_pools()

    def _tell_pools(self) -> None:
        for pool in self.subscribers:
            pool.set_healthy((self.address, self.port), self.healthy)


class HealthRegistry:
    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        probing: bool = True,
        on_transition: Transition | None = None,
    ) -> None:
        self.stats = HealthStats()
        self.probing = probing  # False: a worker that follows another one's probes
        self.on_transition = on_transition
        self.known: dict[CheckKey, bool] = {}  # followers: verdicts reported so far
        self._rng = rng or random.Random()
        self._checkers: dict[CheckKey, Checker] = {}
        self._subscribed: dict[Pool, set[CheckKey]] = {}
        self._stopped: set[asyncio.Task[None]] = set()

    def follow(self, key: CheckKey, healthy: bool) -> None:
        """A verdict of the probing worker (also for checkers this worker starts later)."""
        self.known[key] = healthy
        checker = self._checkers.get(key)
        if checker is not None:
            checker.follow(healthy)

    def checker(self, address: str, port: int, check: HealthCheck) -> Checker | None:
        return self._checkers.get((address, port, check))

    def __len__(self) -> int:
        return len(self._checkers)

    def sync(
        self, pool: Pool, check: HealthCheck | None, faults: RouteFaults | None = None
    ) -> None:
        """Make ``pool`` subscribed to exactly the checkers of its present members under
        ``check`` (None: no checks), with the service port's ``faults`` that asked to act on
        probes (``lbd.health.probe_faults``). Call after building a pool and after every
        update."""
        wanted: set[CheckKey] = set()
        if check is not None:
            wanted = {
                (m.address, m.port, check_for(check, faults, m))
                for m in pool.members
                if not m.draining
            }
        current = self._subscribed.get(pool, set())
        for key in wanted - current:
            self._add(key, pool)
        for key in current - wanted:
            self._remove(key, pool)
            pool.set_healthy(key[:2], True)  # unchecked now: config alone decides
        if wanted:
            self._subscribed[pool] = wanted
        else:
            self._subscribed.pop(pool, None)

    def close(self) -> None:
        """Stop every checker (shutdown); ``wait_closed`` waits for their tasks to end."""
        for checker in self._checkers.values():
            self._stop(checker)
        self._checkers.clear()
        self._subscribed.clear()
        self.stats.health_checkers_active = 0

    async def wait_closed(self) -> None:
        stopped, self._stopped = self._stopped, set()
        await asyncio.gather(*stopped, return_exceptions=True)

    def _stop(self, checker: Checker) -> None:
        checker.stop()
        if checker.task is not None and not checker.task.done():
            self._stopped.add(checker.task)
            checker.task.add_done_callback(self._stopped.discard)

    def _add(self, key: CheckKey, pool: Pool) -> None:
        checker = self._checkers.get(key)
        if checker is None:
            checker = Checker(key, self.stats, self._rng, self.on_transition)
            self._checkers[key] = checker
            if self.probing:
                checker.start()
                self.stats.health_checkers_active += 1
            else:
                checker.healthy = self.known.get(key, True)
        checker.subscribers.add(pool)
        pool.set_healthy(key[:2], checker.healthy)

    def _remove(self, key: CheckKey, pool: Pool) -> None:
        checker = self._checkers.get(key)
        if checker is None:
            return
        checker.subscribers.discard(pool)
        if not checker.subscribers:
            self._stop(checker)
            del self._checkers[key]
            if self.probing:
                self.stats.health_checkers_active -= 1
