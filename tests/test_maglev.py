"""Maglev (lbd.balancing.maglev) checked against the paper (Eisenbud et al., NSDI 2016, 3.4):
its worked example, its permutation rule, and a literal transcription of its Algorithm 1; then
the properties lbd relies on across nodes: order does not matter, two balancers agree, removing
one of N endpoints moves about 1/N of the clients, weights are honoured, retries are
deterministic."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbd.balancing import make_balancer
from lbd.balancing.hashing import set_weight
from lbd.balancing.maglev import MaglevBalancer, is_prime, populate, preference, turn_rates
from lbd.balancing.source_hash import SourceHashBalancer
from lbd.config import load_text
from lbd.config.routes import route_specs
from lbd.endpoints.route import Route


@dataclass(eq=False)
class Ep:
    address: str
    weight: float = 1
    active: int = 0
    port: int = 8080

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


def endpoints(count: int) -> list[Ep]:
    return [Ep(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(count)]


CLIENTS = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(20_000)]


def paper_populate(permutation: list[list[int]], weights: list[int], size: int) -> list[int]:
    """Algorithm 1 as printed (next[], entry[], n), with one addition for weights: in round r
    endpoint i takes a turn when floor(r * w_i / w_max) grows. Equal weights: every round."""
    count = len(permutation)
    next_ = [0] * count
    entry = [-1] * size
    n = 0
    heaviest = max(weights)
    round_ = 0
    while True:
        round_ += 1
        for i in range(count):
            if round_ * weights[i] // heaviest == (round_ - 1) * weights[i] // heaviest:
                continue  # not this endpoint's turn in this round
            c = permutation[i][next_[i]]
            while entry[c] >= 0:
                next_[i] += 1
                c = permutation[i][next_[i]]
            entry[c] = i
            next_[i] += 1
            n += 1
            if n == size:
                return entry


def permutation_of(offset: int, skip: int, size: int) -> list[int]:
    return [(offset + j * skip) % size for j in range(size)]


def test_the_papers_worked_example() -> None:
    # Table 1 of the paper: M = 7, B0 (offset 3, skip 4), B1 (0, 2), B2 (3, 1).
    example = [(3, 4), (0, 2), (3, 1)]
    assert [permutation_of(o, s, 7) for o, s in example] == [
        [3, 0, 4, 1, 5, 2, 6],
        [0, 2, 4, 6, 1, 3, 5],
        [3, 4, 5, 6, 0, 1, 2],
    ]
    # Table 2: the lookup table before, and after B1 is removed (slot 6 moves from B0 to B2
    # although neither was removed: Maglev's disruption is small, not minimal).
    assert populate(example, [1, 1, 1], 7) == [1, 0, 1, 0, 2, 2, 0]
    after = populate([example[0], example[2]], [1, 1], 7)
    assert [("B0", "B2")[i] for i in after] == ["B0", "B0", "B0", "B0", "B2", "B2", "B2"]


def test_a_weighted_example_worked_by_hand() -> None:
    # M = 13, the same offsets and skips, weights 2:1:1. B0 turns every round, B1 and B2 every
    # second one: R1 B0->3 | R2 B0->7 B1->0 B2->(3)4 | R3 B0->11 | R4 B0->2 B1->(2,4)6 B2->5 |
    # R5 B0->(6)10 | R6 B0->1 B1->8 B2->(6,7,8)9 | R7 B0->(5,9,0,4,8)12: all 13 slots taken.
    table = populate([(3, 4), (0, 2), (3, 1)], [2, 1, 1], 13)
    assert table == [1, 0, 0, 0, 2, 2, 1, 0, 1, 2, 0, 0, 0]
    assert Counter(table) == {0: 7, 1: 3, 2: 3}


@given(
    size=st.sampled_from([7, 13, 31, 101]),
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    seed=st.integers(0, 2**32),
)
def test_populate_is_the_papers_algorithm(size: int, weights: list[int], seed: int) -> None:
    rng = random.Random(seed)
    preferences = [(rng.randrange(size), rng.randrange(size - 1) + 1) for _ in weights]
    permutations = [permutation_of(o, s, size) for o, s in preferences]
    assert populate(preferences, weights, size) == paper_populate(permutations, weights, size)


def test_the_permutation_rule_and_a_prime_size() -> None:
    for name in ("10.1.0.1:8080", "[fd00::1]:53", "x"):
        offset, skip = preference(name, 13)
        assert 0 <= offset < 13 and 1 <= skip <= 12
        assert sorted(permutation_of(offset, skip, 13)) == list(range(13))
    assert preference("10.1.0.1:8080", 65537) == preference("10.1.0.1:8080", 65537)
    assert is_prime(65537) and is_prime(13) and not is_prime(65536) and not is_prime(1)
    with pytest.raises(ValueError, match="prime"):
        MaglevBalancer(table_size=1000)


def test_the_order_of_the_list_does_not_matter_and_two_nodes_agree() -> None:
    eps = endpoints(7)
    shuffled = eps[:]
    random.Random(4).shuffle(shuffled)
    node_a, node_b = MaglevBalancer(), MaglevBalancer(random.Random(99))
    picks_a = [node_a.pick(eps, c) for c in CLIENTS[:5000]]
    picks_b = [node_b.pick(shuffled, c) for c in CLIENTS[:5000]]
    assert picks_a == picks_b
    # Other objects for the same endpoints (another node's pool) agree by name, not identity.
    twins = [Ep(e.address) for e in eps]
    assert [node_b.pick(twins, c).address for c in CLIENTS[:5000]] == [  # type: ignore[union-attr]
        p.address  # type: ignore[union-attr]
        for p in picks_a
    ]


@pytest.mark.parametrize("count", [5, 10])
def test_removing_one_of_n_moves_about_one_nth(count: int) -> None:
    eps = endpoints(count)
    removed = eps[2]
    left = [e for e in eps if e is not removed]
    balancer, hashed = MaglevBalancer(), SourceHashBalancer()
    before = [balancer.pick(eps, c) for c in CLIENTS]
    after = [balancer.pick(left, c) for c in CLIENTS]
    moved = sum(a is not b for a, b in zip(before, after, strict=True)) / len(CLIENTS)
    on_removed = sum(b is removed for b in before) / len(CLIENTS)
    assert moved == pytest.approx(1 / count, abs=0.02)
    assert moved >= on_removed  # those on the removed endpoint had to move
    # A plain hash modulo N moves most clients: (N - 1) / N of them.
    hashed_before = [hashed.pick(eps, c) for c in CLIENTS]
    hashed_after = [hashed.pick(left, c) for c in CLIENTS]
    hashed_moved = sum(a is not b for a, b in zip(hashed_before, hashed_after, strict=True))
    assert hashed_moved / len(CLIENTS) > 0.6


def test_adding_an_endpoint_moves_about_one_in_n_plus_one() -> None:
    eps = endpoints(5)
    balancer = MaglevBalancer()
    before = [balancer.pick(eps[:4], c) for c in CLIENTS]
    after = [balancer.pick(eps, c) for c in CLIENTS]
    moved = sum(a is not b for a, b in zip(before, after, strict=True)) / len(CLIENTS)
    assert moved == pytest.approx(1 / 5, abs=0.02)


def test_weights_share_the_slots_and_the_clients() -> None:
    eps = [Ep("10.1.0.1", 1), Ep("10.1.0.2", 2), Ep("10.1.0.3", 5)]
    balancer = MaglevBalancer()
    table, members = balancer._sets.lookup(eps)
    slots = Counter(members[i].address for i in table)
    for ep in eps:
        assert slots[ep.address] / len(table) == pytest.approx(ep.weight / 8, abs=0.01)
    clients = Counter(balancer.pick(eps, c).address for c in CLIENTS)  # type: ignore[union-attr]
    for ep in eps:
        assert clients[ep.address] / len(CLIENTS) == pytest.approx(ep.weight / 8, abs=0.02)


def test_equal_weights_share_within_one_percent() -> None:
    eps = endpoints(100)
    table, members = MaglevBalancer()._sets.lookup(eps)
    shares = Counter(table)
    due = len(table) / 100
    assert all(abs(shares[i] - due) / due < 0.05 for i in range(100))
    assert len(shares) == 100 and len(members) == 100


def test_retries_walk_on_deterministically_and_honour_exclude() -> None:
    eps = endpoints(5)
    node_a, node_b = MaglevBalancer(), MaglevBalancer()
    for client in CLIENTS[:300]:
        first = node_a.pick(eps, client)
        assert first is not None
        second = node_a.pick(eps, client, exclude=[first])
        assert second is not None and second is not first
        assert node_b.pick(eps[::-1], client, exclude=[first]) is second
        third = node_a.pick(eps, client, exclude=[first, second])
        assert third not in (first, second, None)
    assert node_a.pick(eps, "x", exclude=eps) is None
    assert node_a.pick(eps, "x", exclude=eps[1:]) is eps[0]
    assert node_a.pick([], "x") is None
    assert node_a.pick([eps[0]], "x", exclude=[eps[0]]) is None


def test_the_table_is_built_once_per_set_and_kept_across_lists() -> None:
    built: list[object] = []

    class Counting(MaglevBalancer):
        __slots__ = ()

        def _build(self, key: object) -> object:  # type: ignore[override]
            built.append(key)
            return super()._build(key)  # type: ignore[arg-type]

    eps = endpoints(4)
    balancer = Counting(table_size=13)
    for client in CLIENTS[:50]:
        balancer.pick(eps, client)
        balancer.pick(eps[:3], client)  # another listener kind's list
        balancer.pick(list(reversed(eps)), client)  # a new list of the same set
    assert len(built) == 2
    eps[0].weight = 2  # a weight change is a new set
    balancer.pick(eps, "c")
    assert len(built) == 3
    eps[0].weight = 1.5001  # slow start: near weights share one table
    balancer.pick(eps, "c")
    eps[0].weight = 1.5003
    balancer.pick(eps, "c")
    assert len(built) == 4


def test_fractional_weights_snap_to_a_grid_and_whole_ones_stay_exact() -> None:
    assert set_weight(3) == 3.0 and set_weight(1000) == 1000.0
    assert set_weight(0.5001) == set_weight(0.4999) == 0.5
    assert turn_rates([1.0, 3.0]) == [1, 3]
    assert turn_rates([0.5, 1.0]) == [1 << 19, 1 << 20]


def test_make_balancer_knows_the_hashing_strategies() -> None:
    assert isinstance(make_balancer("maglev"), MaglevBalancer)
    assert isinstance(make_balancer("source-hash"), SourceHashBalancer)
    assert MaglevBalancer(table_size=13).table_size == 13


def test_a_service_sets_its_strategy_and_table_size() -> None:
    text = (
        "apiVersion: lbd/v1\nservices:\n"
        "  - {name: a, clusterIP: 127.0.0.9, strategy: maglev, maglevTableSize: 13,"
        " ports: [{port: 80}], endpoints: [127.0.1.1, 127.0.1.2]}\n"
    )
    (spec,) = route_specs(load_text(text)).values()
    route = Route(spec)
    assert isinstance(route.balancer, MaglevBalancer) and route.balancer.table_size == 13
    picked = {route.pick(route.pool.eligible(), f"10.0.0.{i}", 0.0) for i in range(50)}
    assert {e.address for e in picked if e is not None} == {"127.0.1.1", "127.0.1.2"}
