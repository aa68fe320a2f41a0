"""Balancing strategies: config word → implementation, in one table."""

from __future__ import annotations

import random

from lbd.balancing.base import Balancer, BalancerFactory, Candidate
from lbd.balancing.least_connection import LeastConnectionBalancer
from lbd.balancing.maglev import DEFAULT_TABLE_SIZE, MaglevBalancer
from lbd.balancing.random_choice import RandomBalancer
from lbd.balancing.round_robin import RoundRobinBalancer
from lbd.balancing.source_hash import SourceHashBalancer
from lbd.config.model import StrategyName

STRATEGIES: dict[StrategyName, BalancerFactory] = {
    "random": RandomBalancer,
    "round-robin": RoundRobinBalancer,
    "least-connection": LeastConnectionBalancer,
    "maglev": MaglevBalancer,
    "source-hash": SourceHashBalancer,
}


def make_balancer(
    strategy: StrategyName,
    rng: random.Random | None = None,
    maglev_table_size: int = DEFAULT_TABLE_SIZE,
) -> Balancer:
    rng = rng if rng is not None else random.Random()
    if strategy == "maglev":
        return MaglevBalancer(rng, maglev_table_size)
    return STRATEGIES[strategy](rng)


__all__ = ["STRATEGIES", "Balancer", "Candidate", "make_balancer"]
