"""``round-robin``: smooth weighted round-robin, as nginx does it.

Each pick adds every candidate's weight to its running score, takes the highest score and
subtracts the total weight from it. With weights 5,1,1 that spreads picks as a a b a c a a
rather than a a a a a b c. Scores are kept per candidate object, so a pool update that keeps
the same objects does not reset the rotation.

Equal weights (the common case) take an O(1) path: a cursor over the eligible list. A retry
(``exclude`` not empty) takes the next candidate after the cursor without moving it, so the
rotation is not consumed by retries: otherwise a dead endpoint would be every new
connection's first try.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from lbd.balancing.base import C


class RoundRobinBalancer:
    __slots__ = ("_cursor", "_scores")

    def __init__(self, rng: random.Random) -> None:
        self._scores: dict[int, float] = {}  # id(candidate) -> running score
        # Start at a random position so that several lbd processes do not move in lockstep.
        self._cursor = rng.randrange(1 << 16)

    def pick(self, eligible: Sequence[C], client: str, exclude: Collection[C] = ()) -> C | None:
        count = len(eligible)
        if count == 0:
            return None
        first_weight = eligible[0].weight
        if any(c.weight != first_weight for c in eligible):
            return self._smooth(eligible, exclude)
        if not exclude:
            self._cursor += 1
            return eligible[self._cursor % count]
        for step in range(1, count + 1):
            candidate = eligible[(self._cursor + step) % count]
            if candidate not in exclude:
                return candidate
        return None

    def _smooth(self, eligible: Sequence[C], exclude: Collection[C]) -> C | None:
        scores = self._scores
        if len(scores) > 4 * len(eligible) + 16:
            self._forget_absent(eligible)
        total = 0.0
        best: C | None = None
        best_score = 0.0
        for candidate in eligible:
            if exclude and candidate in exclude:
                continue
            key = id(candidate)
            score = scores.get(key, 0) + candidate.weight
            scores[key] = score
            total += candidate.weight
            if best is None or score > best_score:
                best, best_score = candidate, score
        if best is not None:
            scores[id(best)] = best_score - total
        return best

    def _forget_absent(self, eligible: Sequence[Any]) -> None:
        present = {id(candidate) for candidate in eligible}
        self._scores = {k: v for k, v in self._scores.items() if k in present}
