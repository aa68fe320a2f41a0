"""source-hash (lbd.balancing.source_hash): a stable hash modulo the endpoints in name order."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lbd.balancing.hashing import stable_hash
from lbd.balancing.source_hash import SourceHashBalancer
from tests.test_maglev import CLIENTS, Ep, endpoints


def test_equal_weights_are_the_hash_modulo_n_in_name_order() -> None:
    eps = endpoints(3)
    ordered = sorted(eps, key=lambda e: f"{e.address}:{e.port}")
    shuffled = eps[::-1]
    balancer = SourceHashBalancer()
    for client in CLIENTS[:500]:
        expected = ordered[stable_hash(client) % 3]
        assert balancer.pick(eps, client) is expected
        assert SourceHashBalancer(random.Random(5)).pick(shuffled, client) is expected


def test_weights_are_honoured() -> None:
    eps = [Ep("10.1.0.1", 1), Ep("10.1.0.2", 3)]
    balancer = SourceHashBalancer()
    counts = Counter(balancer.pick(eps, c).address for c in CLIENTS)  # type: ignore[union-attr]
    assert counts["10.1.0.2"] / len(CLIENTS) == pytest.approx(0.75, abs=0.02)


def test_a_retry_takes_the_next_endpoint_in_name_order() -> None:
    eps = endpoints(4)
    balancer = SourceHashBalancer()
    for client in CLIENTS[:200]:
        first = balancer.pick(eps, client)
        second = balancer.pick(eps, client, exclude=[first])  # type: ignore[list-item]
        assert first is not None and second is not None
        assert eps.index(second) == (eps.index(first) + 1) % 4
    assert balancer.pick(eps, "x", exclude=eps) is None
    assert balancer.pick([], "x") is None


def test_removing_one_of_five_moves_most_clients() -> None:
    eps = endpoints(5)
    balancer = SourceHashBalancer()
    before = [balancer.pick(eps, c) for c in CLIENTS]
    after = [balancer.pick(eps[:2] + eps[3:], c) for c in CLIENTS]
    moved = sum(a is not b for a, b in zip(before, after, strict=True)) / len(CLIENTS)
    assert moved == pytest.approx(4 / 5, abs=0.03)
