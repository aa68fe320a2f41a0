"""Balancers are pure: seeded randomness, no I/O, so distributions are checked exactly."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from lbd.balancing import STRATEGIES, make_balancer


@dataclass(eq=False)
class Ep:
    name: str
    weight: int = 1
    active: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, 80)


def picks(strategy: str, eligible: list[Ep], n: int, seed: int = 1) -> Counter[str]:
    balancer = make_balancer(strategy, random.Random(seed))  # type: ignore[arg-type]
    return Counter(balancer.pick(eligible, "127.0.0.1").name for _ in range(n))


def test_registry_has_every_strategy() -> None:
    assert set(STRATEGIES) == {
        "random",
        "round-robin",
        "least-connection",
        "maglev",
        "source-hash",
    }


def test_round_robin_equal_weights_rotates_exactly() -> None:
    eps = [Ep("a"), Ep("b"), Ep("c")]
    balancer = make_balancer("round-robin", random.Random(0))
    sequence = [balancer.pick(eps, "c").name for _ in range(9)]
    assert sorted(sequence[:3]) == ["a", "b", "c"]
    assert sequence[:3] == sequence[3:6] == sequence[6:9]


def test_round_robin_is_smooth_weighted_like_nginx() -> None:
    # nginx's example: weights 5,1,1 give a a b a c a a, not a a a a a b c.
    eps = [Ep("a", 5), Ep("b", 1), Ep("c", 1)]
    balancer = make_balancer("round-robin", random.Random(0))
    assert [balancer.pick(eps, "c").name for _ in range(7)] == list("aabacaa")
    assert Counter(balancer.pick(eps, "c").name for _ in range(700)) == {
        "a": 500,
        "b": 100,
        "c": 100,
    }


def test_round_robin_over_a_set_with_exclusions_keeps_weights() -> None:
    a, b, c = Ep("a", 2), Ep("b", 1), Ep("c", 1)
    balancer = make_balancer("round-robin", random.Random(0))
    names = [balancer.pick([a, b, c], "x", exclude=[b]).name for _ in range(30)]
    assert Counter(names) == {"a": 20, "c": 10}


@pytest.mark.parametrize("weights", [(1, 1), (2, 2), (1, 2)])
def test_round_robin_retries_do_not_consume_the_rotation(weights: tuple[int, int]) -> None:
    # A dead endpoint must not become every new connection's first try: after a failed try on
    # it and a retry elsewhere, the next connection starts with the other endpoint.
    dead, alive = Ep("dead", weights[0]), Ep("alive", weights[1])
    balancer = make_balancer("round-robin", random.Random(0))
    first_tries = []
    for _ in range(30):
        first = balancer.pick([dead, alive], "x")
        first_tries.append(first.name)
        if first is dead:
            assert balancer.pick([dead, alive], "x", exclude=[dead]) is alive
    share = weights[0] / sum(weights)
    assert first_tries.count("dead") == pytest.approx(30 * share, abs=1)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_honours_exclude_and_returns_none_when_all_excluded(strategy: str) -> None:
    eps = [Ep("a"), Ep("b", 2), Ep("c")]
    balancer = make_balancer(strategy, random.Random(0))  # type: ignore[arg-type]
    for _ in range(20):
        assert balancer.pick(eps, "x", exclude=[eps[0], eps[2]]) is eps[1]
    assert balancer.pick(eps, "x", exclude=eps) is None
    assert balancer.pick([], "x") is None


def test_random_honours_weights() -> None:
    eps = [Ep("a", 1), Ep("b", 3)]
    counts = picks("random", eps, 40_000)
    assert counts["b"] / 40_000 == pytest.approx(0.75, abs=0.01)


def test_random_equal_weights_is_uniform() -> None:
    eps = [Ep(str(i)) for i in range(4)]
    counts = picks("random", eps, 40_000)
    for name in "0123":
        assert counts[name] / 40_000 == pytest.approx(0.25, abs=0.01)


def test_random_is_reproducible_with_a_seed() -> None:
    eps = [Ep("a"), Ep("b", 2), Ep("c")]
    assert picks("random", eps, 100, seed=7) == picks("random", eps, 100, seed=7)


def test_least_connection_picks_fewest_active() -> None:
    eps = [Ep("a", active=3), Ep("b", active=1), Ep("c", active=2)]
    assert picks("least-connection", eps, 50) == {"b": 50}


def test_least_connection_is_relative_to_weight() -> None:
    # a: 4 active / weight 4 = 1.0; b: 2 / 1 = 2.0 -> a, although it has more connections
    eps = [Ep("a", weight=4, active=4), Ep("b", weight=1, active=2)]
    assert picks("least-connection", eps, 20) == {"a": 20}


def test_least_connection_breaks_ties_randomly_and_evenly() -> None:
    eps = [Ep("a", active=1), Ep("b", active=1), Ep("c", active=1), Ep("d", active=5)]
    counts = picks("least-connection", eps, 30_000)
    assert "d" not in counts
    for name in "abc":
        assert counts[name] / 30_000 == pytest.approx(1 / 3, abs=0.015)


def test_least_connection_spreads_held_connections_by_weight() -> None:
    # Connections that stay open: the counts follow the weights 1:2:3.
    eps = [Ep("a", 1), Ep("b", 2), Ep("c", 3)]
    balancer = make_balancer("least-connection", random.Random(3))
    for _ in range(600):
        balancer.pick(eps, "x").active += 1
    assert [e.active for e in eps] == [100, 200, 300]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_single_endpoint_always_picked(strategy: str) -> None:
    assert picks(strategy, [Ep("only", 3)], 10) == {"only": 10}
