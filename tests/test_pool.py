"""The pool without sockets: eligibility (health, ejection, panic), admin overrides, draining
endpoints, watchers, slow start."""

from __future__ import annotations

import asyncio
import random
import time

from lbd.balancing import make_balancer
from lbd.endpoints.endpoint import UpstreamEndpoint, ineligible_reason
from lbd.endpoints.pool import Pool


def pool_of(*targets: tuple[str, int, int]) -> Pool:
    pool = Pool()
    pool.update(targets)
    return pool


def test_eligibility_and_its_reasons() -> None:
    pool = pool_of(("127.0.0.1", 1, 1), ("127.0.0.2", 1, 0), ("127.0.0.3", 1, 1))
    a, b, c = pool.members
    pool.set_admin_drained(c, True)
    assert [ineligible_reason(m) for m in pool.members] == [None, "weight_zero", "admin_drained"]
    assert pool.eligible() == [a]
    pool.set_weight_override(b, 4)
    pool.set_admin_drained(c, False)
    assert pool.eligible() == [a, b, c] and b.weight == 4 and b.config_weight == 0


def test_update_keeps_overrides_of_unchanged_endpoints_only() -> None:
    pool = pool_of(("127.0.0.1", 1, 1), ("127.0.0.2", 1, 1))
    a, b = pool.members
    pool.set_weight_override(a, 5)
    pool.set_admin_drained(b, True)
    assert pool.update([("127.0.0.1", 1, 1), ("127.0.0.2", 1, 2)]) == (0, 0)
    assert (a.weight, a.weight_override) == (5, 5)  # unchanged: the override stays
    assert (b.weight, b.admin_drained) == (2, False)  # its weight changed: cleared
    assert pool.eligible() == [a, b]


def test_removed_endpoints_drain_while_they_have_connections() -> None:
    pool = pool_of(("127.0.0.1", 1, 1), ("127.0.0.2", 1, 1), ("127.0.0.3", 1, 1))
    a, b, _ = pool.members
    pool.acquire(b)
    pool.set_admin_drained(b, True)
    assert pool.update([("127.0.0.1", 1, 1)]) == (0, 2)
    assert pool.members == [a] and pool.draining == [b]  # c had no connections: gone at once
    assert ineligible_reason(b) == "draining" and not b.admin_drained
    pool.release(b)
    assert pool.draining == []
    # Back in the config before its last connection ended: the same object, counts intact.
    pool.acquire(a)
    pool.update([])
    assert pool.update([("127.0.0.1", 1, 1)]) == (1, 0)
    assert pool.members == [a] and a.active == 1 and pool.draining == []


def watched() -> tuple[Pool, list[list[str]]]:
    pool = Pool()
    seen: list[list[str]] = []
    pool.watch(lambda p: seen.append([str(e) for e in p.eligible()]))
    return pool, seen


def test_update_keeps_the_objects_of_endpoints_that_stay() -> None:
    pool = Pool()
    pool.update([("127.0.0.1", 1, 1), ("127.0.0.2", 1, 1)])
    kept = pool.members[1]
    assert pool.update([("127.0.0.2", 1, 3), ("127.0.0.3", 1, 1)]) == (1, 1)
    assert pool.members[0] is kept and kept.weight == 3


def test_watchers_hear_added_removed_and_ineligible_endpoints() -> None:
    pool, seen = watched()
    pool.update([("127.0.0.1", 1, 1), ("127.0.0.2", 1, 1)])
    gone = pool.members[0]
    pool.update([("127.0.0.2", 1, 1)])
    assert gone.draining
    pool.update([("127.0.0.2", 1, 0)])
    pool.update([("127.0.0.2", 1, 1)])
    assert seen == [
        ["127.0.0.1:1", "127.0.0.2:1"],
        ["127.0.0.2:1"],
        [],
        ["127.0.0.2:1"],
    ]


def test_an_update_that_changes_nothing_is_silent() -> None:
    pool, seen = watched()
    pool.update([("127.0.0.1", 1, 1)])
    pool.update([("127.0.0.1", 1, 1)])
    pool.update([("127.0.0.1", 1, 2)])  # a weight change is the balancer's business, not ours
    pool.refresh()
    assert len(seen) == 1


def test_refresh_tells_watchers_when_eligibility_changed_in_place() -> None:
    """Health checks change an endpoint's state, then call refresh()."""
    pool, seen = watched()
    pool.update([("127.0.0.1", 1, 1)])
    pool.members[0].weight = 0
    pool.refresh()
    assert seen[-1] == []


def test_unwatch_stops_notifications() -> None:
    pool = Pool()
    seen: list[int] = []
    unwatch = pool.watch(lambda p: seen.append(len(p.members)))
    pool.update([("127.0.0.1", 1, 1)])
    unwatch()
    unwatch()  # twice is harmless
    pool.update([])
    assert seen == [1]


def test_effective_weight_ramps_linearly_during_slow_start() -> None:
    endpoint = UpstreamEndpoint("127.0.0.1", 80, weight=2)
    full = 2
    assert endpoint.weight == full
    endpoint.start_ramp(10.0)
    assert 0 < endpoint.weight <= full * 0.011
    endpoint.ramp_end = time.monotonic() + 2.5  # a quarter of the ramp left
    assert abs(endpoint.weight - full * 0.75) <= full * 0.01
    endpoint.ramp_end = time.monotonic() - 0.001
    assert endpoint.weight == full and endpoint.ramp_end == 0.0


def test_slow_start_applies_to_added_and_recovered_endpoints_not_the_first() -> None:
    pool = Pool(name="t", slow_start=30.0)
    pool.update([("127.0.0.1", 80, 1)])
    first = pool.members[0]
    assert first.ramp_end == 0.0  # nothing to protect a first endpoint from
    pool.update([("127.0.0.1", 80, 1), ("127.0.0.2", 80, 1)])
    added = pool.members[1]
    assert added.ramp_end and added.weight < 0.1
    pool.set_healthy(first.key, False)
    assert first.ramp_end == 0.0
    pool.set_healthy(first.key, True)
    assert first.ramp_end and first.weight < 0.1
    pool.set_ejected(added, True)
    added.ramp_end = 0.0
    pool.set_ejected(added, False)
    assert added.ramp_end


def test_zero_weight_draining_unhealthy_and_ejected_are_not_eligible() -> None:
    pool = Pool(name="t")
    pool.update([("127.0.0.1", 80, 1), ("127.0.0.2", 80, 0), ("127.0.0.3", 80, 1)])
    a, b, c = pool.members
    pool.set_ejected(c, True)
    assert pool.eligible() == [a]
    assert [ineligible_reason(m) for m in pool.members] == [None, "weight_zero", "ejected"]
    pool.set_healthy(a.key, False)
    assert ineligible_reason(a) == "unhealthy"
    assert pool.eligible() == [a, c] and pool.panic  # only sick ones left: use them all
    assert b not in pool.eligible()  # weight 0 is never used, not even in panic
    pool.update([("127.0.0.3", 80, 1)])
    assert a.draining and pool.eligible() == [c] and pool.panic
    pool.set_ejected(c, False)
    assert pool.eligible() == [c] and not pool.panic


async def test_a_ramping_endpoint_gets_a_growing_share_of_picks() -> None:
    pool = Pool(name="t", slow_start=1.0)
    pool.update([("127.0.0.1", 80, 1)])
    pool.update([("127.0.0.1", 80, 1), ("127.0.0.2", 80, 1)])
    new = pool.members[1]
    balancer = make_balancer("round-robin", random.Random(3))

    def share() -> float:
        picks = [balancer.pick(pool.eligible(), "c") for _ in range(1000)]
        return picks.count(new) / len(picks)

    start = share()
    new.ramp_end = time.monotonic() + 0.5  # half way
    middle = share()  # weights 1 : 0.5 -> a third
    await asyncio.sleep(0.6)
    end = share()
    assert start < 0.05 and 0.25 < middle < 0.40 and end == 0.5
