"""What a balancer is: given the eligible endpoints and the client, pick one.

Balancers do no I/O and own no endpoint state: ``active`` counts belong to the pool. A balancer
may keep its own position (round-robin) and takes its randomness from an injected
``random.Random``, so tests can seed it and check distributions exactly.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """The view of an endpoint a balancer needs."""

    @property
    def weight(self) -> float: ...  # a fraction while an endpoint ramps up (slow start)

    @property
    def active(self) -> int: ...

    @property
    def key(self) -> tuple[str, int]: ...  # (address, port): the same on every node


C = TypeVar("C", bound=Candidate)


class Balancer(Protocol):
    def pick(self, eligible: Sequence[C], client: str, exclude: Collection[C] = ()) -> C | None:
        """One of ``eligible`` (every weight > 0) that is not in ``exclude``, for a connection
        from ``client``; None when nothing is left.

        ``exclude`` holds the endpoints a connection already tried: a retry must not consume
        the rotation, or a dead endpoint would be every new connection's first try.
        """
        ...


class BalancerFactory(Protocol):
    def __call__(self, rng: random.Random) -> Balancer: ...


def all_equal_weight(eligible: Sequence[Candidate]) -> bool:
    first = eligible[0].weight
    return all(candidate.weight == first for candidate in eligible)


def remaining(eligible: Sequence[C], exclude: Collection[C]) -> Sequence[C]:
    return [c for c in eligible if c not in exclude] if exclude else eligible
