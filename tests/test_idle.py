"""The idle wheel: deadlines fire on time (never early, at most one tick late), removal works,
and one timer serves every connection."""

from __future__ import annotations

import asyncio

from lbd.net.idle import TICK, Idler, IdleWheel


class Conn:
    def __init__(self, wheel: IdleWheel, name: str, fired: dict[str, float]) -> None:
        self.idle_bucket: set[Idler] | None = None
        self.wheel = wheel
        self.name = name
        self.fired = fired
        self.refile_until: float | None = None
        self.event = asyncio.Event()

    def check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        if self.refile_until is not None and loop.time() < self.refile_until:
            self.wheel.file(self, self.refile_until)  # it was active: a later deadline
            return
        self.fired[self.name] = loop.time()
        self.event.set()


async def test_deadlines_fire_not_early_and_at_most_one_tick_late() -> None:
    loop = asyncio.get_running_loop()
    wheel = IdleWheel()
    fired: dict[str, float] = {}
    start = loop.time()
    deadlines = {"a": start + 0.1, "b": start + 0.3, "c": start + 0.05}
    conns = [Conn(wheel, name, fired) for name in deadlines]
    for conn in conns:
        wheel.file(conn, deadlines[conn.name])
    assert len(wheel) == 3
    await asyncio.wait_for(asyncio.gather(*(c.event.wait() for c in conns)), 2)
    for name, deadline in deadlines.items():
        # (uvloop's timers have millisecond resolution: a few ms early is the loop, not us;
        # Downstream.check_idle re-files a connection whose deadline has not quite come.)
        assert deadline - 0.005 <= fired[name] <= deadline + TICK + 0.1, name
    assert len(wheel) == 0


async def test_removed_connections_never_fire() -> None:
    loop = asyncio.get_running_loop()
    wheel = IdleWheel()
    fired: dict[str, float] = {}
    gone, kept = Conn(wheel, "gone", fired), Conn(wheel, "kept", fired)
    wheel.file(gone, loop.time() + 0.05)
    wheel.file(kept, loop.time() + 0.05)
    wheel.remove(gone)
    assert gone.idle_bucket is None and len(wheel) == 1
    await asyncio.wait_for(kept.event.wait(), 2)
    assert "gone" not in fired


async def test_an_active_connection_is_filed_again_under_its_new_deadline() -> None:
    loop = asyncio.get_running_loop()
    wheel = IdleWheel()
    fired: dict[str, float] = {}
    conn = Conn(wheel, "busy", fired)
    start = loop.time()
    conn.refile_until = start + 0.6
    wheel.file(conn, start + 0.1)
    await asyncio.wait_for(conn.event.wait(), 2)
    assert start + 0.6 - 0.005 <= fired["busy"] <= start + 0.6 + TICK + 0.1


async def test_filing_again_moves_the_connection() -> None:
    loop = asyncio.get_running_loop()
    wheel = IdleWheel()
    fired: dict[str, float] = {}
    conn = Conn(wheel, "moved", fired)
    start = loop.time()
    wheel.file(conn, start + 0.05)
    wheel.file(conn, start + 0.5)  # e.g. re-filed: only the later deadline counts
    assert len(wheel) == 1
    await asyncio.wait_for(conn.event.wait(), 2)
    assert fired["moved"] >= start + 0.5 - 0.005
