"""What the hashing balancers (``maglev``, ``source-hash``) share: a hash that every node computes
alike, and each eligible set in a canonical form that does not depend on the order of the list.

Two lbd nodes behind one router must send a client to the same endpoint without talking to each
other. So nothing here may depend on the process: not Python's ``hash()`` (salted per process),
not the order in which a pool happens to list its endpoints, not object identities. An endpoint
is known by its name, ``address:port``; a set of endpoints by its names and weights, sorted.

Building the structure a balancer looks clients up in (a Maglev table) costs far more than a
lookup, so it is built once per distinct set and kept: per eligible list (a pool hands out the
same list object until its membership changes) the weights are compared on every pick, which is
as cheap as the weight scan round-robin already does, and the structure is rebuilt only when the
set of (name, weight) changed. A few sets are kept at once, since one service port picks from
several lists (clusterIP listeners and, under ``externalTrafficPolicy: Local``, external ones).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from lbd.balancing.base import C, Candidate

T = TypeVar("T")
# (name, weight) of every endpoint, sorted by name: a set of endpoints as every node sees it.
SetKey = tuple[tuple[str, float], ...]
# Slow start ramps a weight continuously; on a grid of 8 steps per doubling (about 9 % apart) a
# ramp from 1 % to 100 % crosses some 50 steps, so the structure is rebuilt that often, not per
# connection. Whole-number weights (the config's and the admin API's) are kept exactly.
STEPS_PER_DOUBLING = 8
KEPT_SETS = 4


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and on every node."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def endpoint_name(candidate: Candidate) -> str:
    """``address:port``: what identifies an endpoint to a hashing balancer on every node."""
    address, port = candidate.key
    return f"{address}:{port}"


def set_weight(weight: float) -> float:
    """``weight`` as the hashing balancers use it: exact when whole, else on a geometric grid."""
    if weight == int(weight):
        return float(weight)
    step = round(math.log2(weight) * STEPS_PER_DOUBLING)
    return float(2.0 ** (step / STEPS_PER_DOUBLING))


@dataclass(slots=True, eq=False)
class _View(Generic[T]):
    eligible: Sequence[Any]  # held, so that its id() cannot be reused while cached
    weights: list[float]
    members: list[Any]  # the eligible endpoints, sorted by name
    built: T


class CanonicalSets(Generic[T]):
    """``build(key)`` for each distinct eligible set, kept for the next picks.

    ``lookup(eligible)`` returns what ``build`` made for that set and the set's endpoints in
    canonical order (by name), which is the order ``build`` saw them in: index i of the built
    structure means ``members[i]``.
    """

    __slots__ = ("_build", "_built", "_views")

    def __init__(self, build: Callable[[SetKey], T]) -> None:
        self._build = build
        self._views: dict[int, _View[T]] = {}
        self._built: dict[SetKey, T] = {}

    def lookup(self, eligible: Sequence[C]) -> tuple[T, list[C]]:
        weights = [candidate.weight for candidate in eligible]
        view = self._views.get(id(eligible))
        if view is None or view.eligible is not eligible or view.weights != weights:
            view = self._refresh(eligible, weights)
        return view.built, cast(list[C], view.members)

    def _refresh(self, eligible: Sequence[C], weights: list[float]) -> _View[T]:
        named = sorted(
            ((endpoint_name(c), set_weight(w), c) for c, w in zip(eligible, weights, strict=True)),
            key=lambda item: item[0],
        )
        key: SetKey = tuple((name, weight) for name, weight, _ in named)
        built = self._built.pop(key, None)
        if built is None:
            built = self._build(key)
        self._built[key] = built  # most recently used last
        _keep_newest(self._built)
        view = _View(eligible, weights, [c for _, _, c in named], built)
        self._views.pop(id(eligible), None)
        self._views[id(eligible)] = view
        _keep_newest(self._views)
        return view


def _keep_newest(cache: dict[Any, Any]) -> None:
    while len(cache) > KEPT_SETS:
        del cache[next(iter(cache))]
