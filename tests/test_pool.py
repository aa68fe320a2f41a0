"""The pool: membership updates keep endpoint objects, and watchers hear about changes."""

from __future__ import annotations

from lbd.pool import Pool


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
